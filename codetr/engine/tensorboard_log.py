"""TensorBoard event files beside log.jsonl: RUN/tb/, so `tensorboard --logdir runs/` shows every run of a grid.

Scalars, with the training step (optimizer steps, log.jsonl's "step") on the x axis:
    train/<key>   each value of an iteration record: every raw loss term, loss, lr, time, stats.*
    eval/<key>    each metric of an evaluation (AP, AP50, ...), at the step it was run after
The values are log.jsonl's, stored as float32 (TensorBoard's precision). Written by rank 0 only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

# Position keys of a record: they are the x axis (step) or redundant with it, not curves.
POSITION_KEYS = ("epoch", "iter", "step", "event")


class TensorBoardLog:
    """A SummaryWriter on `log_dir` that continues a run resumed after `resumed_step` optimizer steps."""

    def __init__(self, log_dir: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard takes a while to load

        # An interrupted run may have written events after its last checkpoint; they are run again now.
        # purge_step makes TensorBoard drop the earlier files' events at steps >= resumed_step + 1 (the
        # evaluation logged at the checkpoint's own step is not re-run, so it stays).
        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_step + 1)

    def iteration(self, record: dict[str, Any]) -> None:
        self._scalars("train", record, record["step"])

    def evaluation(self, metrics: dict[str, Any], step: int) -> None:
        self._scalars("eval", metrics, step)
        self.writer.flush()  # an evaluation is rare and worth seeing at once

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def _scalars(self, section: str, values: dict[str, Any], step: int) -> None:
        for key, value in values.items():
            if key not in POSITION_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{section}/{key}", value, step)
