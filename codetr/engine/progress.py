"""A rich progress bar for training that shows running averages of the loss terms."""
from __future__ import annotations

from collections import defaultdict

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from codetr.models.loss_terms import is_loss_term, parse_term


def summarize_terms(record: dict[str, float]) -> dict[str, float]:
    """Group raw terms by their type over all layers/heads: {'loss': total, 'cls': ..., 'bbox': ..., 'giou': ...}."""
    summary: dict[str, float] = defaultdict(float)
    for name, value in record.items():
        if name == "loss":
            summary["loss"] = value
        elif is_loss_term(name):
            summary[parse_term(name).short_type] += value
    return dict(summary)


class TrainProgress:
    """Context manager: one bar per epoch; `advance(record)` updates the running means shown beside it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            disable=not enabled,
        )
        self.task = None
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        self.sums.clear()
        self.count = 0
        self.task = self.progress.add_task("train", total=total, completed=done, epoch=epoch, losses="")

    def advance(self, record: dict[str, float]) -> None:
        self.count += 1
        for name, value in summarize_terms(record).items():
            self.sums[name] += value
        text = " ".join(f"{name}={total / self.count:.3f}" for name, total in self.sums.items())
        self.progress.update(self.task, advance=1, losses=text)

    def end_epoch(self) -> None:
        if self.task is not None:
            self.progress.stop_task(self.task)
