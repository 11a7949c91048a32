"""Read a released `.pth` checkpoint without running its pickle code.

Released mmdetection checkpoints carry more than tensors: `meta` (numpy scalars, class names, the config
text), mmengine's `message_hub` (HistoryBuffer objects holding numpy arrays), optimizer and scheduler
state. A plain `torch.load` would import and call whatever the pickle names. Instead the file is read
with `torch.load(weights_only=True)` and an explicit allow-list:

- numpy's array / scalar / dtype reconstructors (real numpy: they only rebuild data);
- classes of the OpenMMLab packages (mmengine, mmcv, mmdet) are NEVER imported: each is replaced by an
  inert `ForeignObject` that only records what was pickled into it;
- any other global (os.system, builtins.eval, ...) refuses the file before anything is unpickled.

Only the state dict and `meta` are used; the rest is reported as skipped.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from codetr.errors import CheckpointError

# Modules whose classes are replaced by inert records (never imported).
FOREIGN_RECORD_MODULES = ("mmengine", "mmcv", "mmdet", "mmdet3d", "mmcls", "mmpretrain", "mmseg", "addict")
# Top-level entries that can hold the weights, by framework: mmcv / mmengine, codetr / DETR, others.
STATE_DICT_ENTRIES = ("state_dict", "model", "module")


class ForeignObject:
    """An inert stand-in for a pickled object of an OpenMMLab class (e.g. mmengine's HistoryBuffer).

    It keeps the constructor arguments and the pickled state as plain data and never runs any code of
    the class it stands for (whose qualified name is `foreign_name`).
    """

    foreign_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.foreign_name} (not loaded)>"


def _numpy_globals() -> list[tuple[Callable, str]]:
    """numpy's reconstructors under the names numpy 1.x and 2.x pickle them with."""
    from numpy._core import multiarray  # numpy >= 2 (numpy.core is its deprecated alias)

    pairs: list[tuple[Callable, str]] = []
    for package in ("numpy.core", "numpy._core"):
        pairs += [(multiarray._reconstruct, f"{package}.multiarray._reconstruct"),
                  (multiarray.scalar, f"{package}.multiarray.scalar")]
    pairs += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    # A pickled dtype is rebuilt by numpy.dtype(...) and then given its state: the unpickler only sets
    # state on allow-listed types, i.e. on the concrete dtype classes (numpy.dtypes.Float64DType, ...).
    pairs += [(cls, f"numpy.dtypes.{name}") for name, cls in vars(np.dtypes).items()
              if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return pairs


def _stand_in(name: str) -> type[ForeignObject]:
    return type(name.rsplit(".", 1)[-1], (ForeignObject,), {"foreign_name": name, "__module__": __name__})


def allowed_globals(names: list[str]) -> tuple[list[tuple[Callable, str]], list[str], list[str]]:
    """Split the globals a pickle names into (allow-list entries, names replaced by stand-ins, refused)."""
    numpy_pairs = {name: obj for obj, name in _numpy_globals()}
    entries, stand_ins, refused = [], [], []
    if "numpy.dtype" in names:  # the concrete dtype classes are never named in the pickle itself
        entries += [(obj, name) for name, obj in numpy_pairs.items() if name.startswith("numpy.dtypes.")]
    for name in names:
        if name in numpy_pairs:
            entries.append((numpy_pairs[name], name))
        elif name.split(".", 1)[0] in FOREIGN_RECORD_MODULES:
            entries.append((_stand_in(name), name))
            stand_ins.append(name)
        else:
            refused.append(name)
    return entries, stand_ins, refused


@dataclass
class ForeignCheckpoint:
    """What a released checkpoint holds, read safely."""

    state_dict: dict[str, Tensor]
    meta: dict[str, Any]  # the checkpoint's `meta` entry ({} if none); stand-ins for OpenMMLab objects
    skipped: list[str] = field(default_factory=list)  # top-level entries not used (optimizer, message_hub, ...)
    stand_ins: list[str] = field(default_factory=list)  # OpenMMLab classes read as inert ForeignObjects


def read_pickled(path: str | Path) -> tuple[Any, list[str]]:
    """torch.load(weights_only=True) with the allow-list above -> (object, names read as stand-ins).

    Refuses (CheckpointError, one line) a file that names any other global: nothing of it is unpickled.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    if not zipfile.is_zipfile(file):
        # Legacy (pre-1.6) torch files cannot be scanned for globals before unpickling: not supported.
        raise CheckpointError(f"cannot read checkpoint {file}: not a torch zip checkpoint "
                              "(re-save it with torch >= 1.6, or it is not a checkpoint)")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)  # static scan, runs nothing
    except Exception as error:  # a damaged zip, a truncated pickle
        raise CheckpointError(f"cannot read checkpoint {file}: {type(error).__name__}: {error}".splitlines()[0]) from None
    entries, stand_ins, refused = allowed_globals(names)
    if refused:
        raise CheckpointError(f"refusing to load {file}: it names {', '.join(refused[:3])}"
                              f"{', ...' if len(refused) > 3 else ''}, which is not data (could run code; "
                              "allowed: tensors, numpy data, OpenMMLab records)")
    try:
        with torch.serialization.safe_globals(entries):
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as error:
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(f"cannot read checkpoint {file}: {reason}") from None
    return obj, stand_ins


def _state_dict_of(obj: Any, file: Path) -> tuple[dict[str, Tensor], str | None]:
    """The tensors of a checkpoint and the top-level entry they came from (None: the file is the dict)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a {type(obj).__name__}, not a checkpoint dict")
    for entry in STATE_DICT_ENTRIES:
        if isinstance(obj.get(entry), dict) and obj[entry] and all(isinstance(v, Tensor) for v in obj[entry].values()):
            return dict(obj[entry]), entry
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), None
    raise CheckpointError(f"{file} has no state dict: expected a dict of tensors, or one under "
                          f"{' / '.join(repr(e) for e in STATE_DICT_ENTRIES)}; top-level keys: {', '.join(map(str, list(obj)[:8]))}")


def read_foreign_checkpoint(path: str | Path) -> ForeignCheckpoint:
    """The state dict and `meta` of a released checkpoint (mmcv / mmengine layout, or a bare state dict).

    A `module.` prefix on every key (a model saved inside DistributedDataParallel) is removed.
    """
    file = Path(path)
    obj, stand_ins = read_pickled(file)
    state_dict, entry = _state_dict_of(obj, file)
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    meta = obj.get("meta") if entry is not None and isinstance(obj.get("meta"), dict) else {}
    skipped = [str(k) for k in obj if entry is not None and k not in (entry, "meta")]
    return ForeignCheckpoint(state_dict, meta, skipped, sorted(set(stand_ins)))
