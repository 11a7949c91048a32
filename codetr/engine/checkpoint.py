"""Checkpoints: atomic saves, readable errors on load, architecture checks that list mismatched keys."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from codetr.errors import CheckpointError
from codetr.io import atomic_torch_save

FORMAT_VERSION = 1
REQUIRED_KEYS = ("model", "config", "num_classes", "cat_ids", "class_names")  # what rebuilding the detector reads


class IncompleteCheckpoint(CheckpointError):
    """A file shaped like a codetr checkpoint ('model' and 'config') that lacks what rebuilding the model needs."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` (model / optimizer / ... state dicts, epoch, config) atomically."""
    atomic_torch_save({"format_version": FORMAT_VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # tensors and plain data only: no code runs
    except Exception as error:  # truncated download, not a torch file, ...
        if isinstance(error, pickle.UnpicklingError):
            reason = "not a torch checkpoint, or it holds objects other than tensors and plain data (never loaded)"
        else:
            reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(f"cannot read checkpoint {file}: {reason}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{file} is not a codetr checkpoint (expected keys 'model' and 'config')")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing or not isinstance(state["model"], dict) or not isinstance(state["config"], dict):
        raise IncompleteCheckpoint(f"{file}: a codetr checkpoint holds a 'model' state dict, a 'config' dict and "
                                   f"{', '.join(REQUIRED_KEYS[2:])}; this one "
                                   + (f"lacks {', '.join(missing)}" if missing else "has other types there"))
    return state


def _module_of(key: str) -> str:
    """'transformer.decoder.layers.2.ffn.0.weight' -> 'transformer.decoder.layers.2' (up to the first index)."""
    parts = key.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or key


def _summarize(keys: list[str]) -> str:
    modules = sorted({_module_of(k) for k in keys})
    shown = ", ".join(modules[:10]) + (f", ... ({len(modules)} modules)" if len(modules) > 10 else "")
    return f"{len(keys)} keys in {shown}"


# Parameters added since a checkpoint format was written, with the value that leaves an older model's
# function unchanged: the auxiliary stride-128 conv gained the released model's bias (zero = no bias).
ADDED_PARAMETERS = {"aux.feature_maps.downsample.0.bias": "aux.feature_maps.downsample.0.weight"}


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Strict load that, on mismatch, names the missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    state_dict = dict(state_dict)
    for added, sibling in ADDED_PARAMETERS.items():
        if added in own and added not in state_dict and sibling in state_dict:
            state_dict[added] = torch.zeros_like(own[added])
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if state_dict[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"{label}: {_summarize(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        if mismatched:
            k = mismatched[0]
            parts.append(f"e.g. {k} is {tuple(state_dict[k].shape)} in the checkpoint, {tuple(own[k].shape)} here")
        raise CheckpointError(f"{source} does not fit this architecture; " + "; ".join(parts))
    model.load_state_dict(state_dict)
