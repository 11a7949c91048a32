"""Saving the analyses' figures: built with matplotlib's object API (`Figure`, no pyplot state, no backend
switch, so notebooks keep their inline backend), written here as PNG, atomically."""
from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from codetr.io import atomic_write_bytes


def save_figure(figure: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Write `figure` as a PNG at `path`, atomically. Returns the path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
