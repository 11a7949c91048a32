"""Execute one run of a grid: train + evaluate into its folder, resuming from its last checkpoint.

    python -m experiments.worker GRID/<run name> [--device cuda] [--grid-pid PID]
    torchrun --nproc_per_node 2 -m experiments.worker GRID/<run name>

The launchers start it as a child process (so a crash, an out-of-memory kill or a leak stays inside
one run) or call `execute_run` directly (slurm via submitit). It records in `status.json` whether the
run is done (with metrics, seconds per iteration and peak memory) or failed (with the error line).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

from codetr.config import config_from_dict
from codetr.engine.memory import peak_memory_mb
from experiments.store import DONE, FAILED, RUNNING, LockBusy, RunLock, read_json, read_status, update_status


def seconds_per_iteration(log_file: Path) -> float | None:
    """Median wall time of the training iterations recorded in a run's log.jsonl."""
    if not log_file.exists():
        return None
    times = []
    for line in log_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "time" in record and record.get("event") is None:
            times.append(record["time"])
    return statistics.median(times) if times else None


def error_line(error: BaseException) -> str:
    """One line for status.json: the exception type and the last line of its message."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


LOCK_BUSY_EXIT = 75  # another process executes this run: not a failure of the run


def execute_run(run_dir: Path, device: str = "") -> bool:
    """Train and evaluate the run in `run_dir` (resuming when it has a checkpoint). Returns success.

    Every exception is recorded as `failed` in status.json (KeyboardInterrupt leaves the run resumable),
    so one failing run never stops a grid. A run already done is not executed again. Raises LockBusy
    when another process is executing this run.
    """
    from codetr.engine.train import Trainer

    run_dir = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    with RunLock(run_dir) if rank == 0 else contextlib.nullcontext():
        previous = read_status(run_dir)
        if previous["state"] == DONE:  # e.g. a duplicate job that started after the run finished
            return True
        started = time.time()
        if rank == 0:
            update_status(run_dir, state=RUNNING, error=None, host=socket.gethostname(), pid=os.getpid(),
                          started=started, attempts=previous.get("attempts", 0) + 1)
        cfg = config_from_dict(read_json(run_dir / "run.json")["config"])
        try:
            trainer = Trainer(cfg, run_dir, resume=(run_dir / "last.pt").exists(), device=device, progress=False)
            if rank == 0:
                update_status(run_dir, total_iters=trainer.iterations_per_epoch() * cfg.optim.epochs,
                              iters_per_epoch=trainer.iterations_per_epoch())
            metrics = trainer.run()
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of one run is recorded, the grid goes on
            traceback.print_exc()
            if rank == 0:
                update_status(run_dir, state=FAILED, error=error_line(error), finished=time.time())
            return False
        if rank == 0:
            if not metrics:  # finished earlier, only the status was lost: reuse the written evaluation
                metrics = {k: v for k, v in read_json(run_dir / "metrics.json", {}).items() if isinstance(v, float)}
            # the peak of this attempt's process (an interrupted attempt never recorded its own)
            peak = peak_memory_mb(trainer.device)
            update_status(
                run_dir, state=DONE, finished=time.time(), metrics=metrics,
                sec_per_iter=seconds_per_iteration(run_dir / "log.jsonl"), peak_mem_mb=peak,
                wall_s=time.time() - started,  # this attempt's
            )
        return True


def exit_with_grid(grid_pid: int) -> None:
    """Stop this process when the grid process that started it dies (even by SIGKILL), so a killed
    grid leaves no orphan training behind; the re-run resumes from the last checkpoint instead. (Under
    torchrun the grid is not the parent, so this checks the grid's pid rather than the parent's.)"""

    def watch() -> None:
        while True:
            try:
                os.kill(grid_pid, 0)
            except ProcessLookupError:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--device", default="")
    parser.add_argument("--grid-pid", type=int, default=0, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.grid_pid:
        exit_with_grid(args.grid_pid)
    try:
        return 0 if execute_run(args.run_dir, args.device) else 1
    except LockBusy as busy:
        print(busy, file=sys.stderr)
        return LOCK_BUSY_EXIT


if __name__ == "__main__":
    sys.exit(main())
