"""codetr: a pure-PyTorch toolkit for Co-DETR research."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("codetr")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0+unknown"
