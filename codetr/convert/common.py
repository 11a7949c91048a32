"""What every checkpoint converter returns, and the strictness every converter applies.

A converter (codetr/convert/<source>.py) exposes `convert(state_dict) -> Conversion`: it reads the
architecture off the foreign state dict's keys and shapes, renames every tensor to codetr's names, and
raises `ConversionError` naming the keys it could not place. Nothing is dropped silently: a foreign key
that deliberately has no codetr counterpart goes into `skipped`, which the caller reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from codetr.config import ModelConfig
from codetr.errors import CheckpointError


class ConversionError(CheckpointError):
    """A foreign checkpoint whose keys or shapes do not fit the architecture read off it."""


@dataclass
class Conversion:
    model: ModelConfig  # the architecture read off the foreign state dict
    state_dict: dict[str, Tensor]  # codetr's names and layouts
    num_classes: int
    skipped: list[str] = field(default_factory=list)  # foreign keys deliberately not carried, reported
