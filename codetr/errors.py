"""Errors raised for bad user input.

Each carries one line that names the file / key / value and what was expected; the CLI prints that
line and exits non-zero instead of showing a traceback.
"""


class CodetrError(Exception):
    """Base class: an error the user can fix (bad input), as opposed to a bug."""


class DataError(CodetrError):
    """A dataset file, image or annotation is missing or malformed."""


class ConfigError(CodetrError):
    """An unknown preset, config key or unparsable value."""


class CheckpointError(CodetrError):
    """A checkpoint is missing, corrupt, or from another architecture."""


class TrainingError(CodetrError):
    """Training cannot continue (e.g. a non-finite loss)."""


class DivergenceError(TrainingError, ValueError):
    """The model diverged: a loss, a weight, a matching cost or a prediction is NaN or infinite."""


class DiskFullError(CodetrError, OSError):
    """A write failed for lack of space (ENOSPC) or quota (EDQUOT). Still an OSError, so code that handles
    OSError keeps doing so; the CLI prints its one line."""
