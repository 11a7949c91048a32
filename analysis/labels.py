"""Short, unique names for checkpoints, shared by every analysis (tables, legends, CSV rows, folders)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from codetr.errors import ConfigError


def checkpoint_labels(paths: Sequence[str | Path]) -> list[str]:
    """The shortest unique path suffixes, of at least two parts, without the file suffix.

    /runs/co/last.pt -> "co/last"; /a/co/last.pt and /b/co/last.pt -> "a/co/last" and "b/co/last". Paths
    are resolved first; the same checkpoint given twice is a ConfigError. Two files that differ only in
    their suffix (last.pt, last.pth) keep it ("co/last.pt", "co/last.pth").
    """
    resolved = [Path(p).resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        twice = next(str(p) for p, r in zip(paths, resolved) if resolved.count(r) > 1)
        raise ConfigError(f"--ckpt {twice}: the same checkpoint is given twice")
    names = [p.with_suffix("") for p in resolved]
    if len(set(names)) != len(names):
        names = resolved
    depth = 2
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in names]
        if len(set(labels)) == len(labels) or depth >= max(len(p.parts) for p in names):
            return labels
        depth += 1
