"""Launchers: how the runs of a grid get executed.

    local     one run after another in a child process (the default)
    parallel  N child processes at once: one per GPU (or per `--gpus-per-run` GPUs) when GPUs exist,
              else N CPU workers sharing the cores
    slurm     a submitit job array on a Slurm cluster, requeued on timeout (resuming from the run's
              last checkpoint); without `sbatch` on the machine, submitit's local executor runs the jobs

A run that asks for several GPUs runs under `torchrun` (DDP). While the runs execute, the grid
process shows a grid-level progress bar and one bar per active run, read from each run's log.jsonl.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from codetr.errors import ConfigError
from experiments.store import DONE, FAILED, PENDING, RunRecord, is_locked, read_status, update_status

LAUNCHERS = ("local", "parallel", "slurm")
MAX_KILLED_ATTEMPTS = 3  # a run killed by a signal this often is failed, not interrupted


@dataclass
class LaunchOptions:
    launcher: str = "local"
    workers: int = 2  # parallel launcher on CPU
    gpus_per_run: int = 1
    device: str = ""
    slurm_partition: str = ""
    slurm_time_min: int = 240
    slurm_cpus_per_task: int = 8
    poll_s: float = 1.0


def runs_to_execute(runs: list[RunRecord], retry_failed: bool) -> tuple[list[RunRecord], dict[str, int]]:
    """Pick what a (re-)run of the grid must execute: pending and interrupted runs, failed ones only
    with `retry_failed`. Done runs and runs executing elsewhere (their lock is held) are skipped."""
    todo, skipped = [], {"done": 0, "failed": 0, "running elsewhere": 0}
    for run in runs:
        state = run.status()["state"]
        if is_locked(run.directory):  # whatever its status says, a process is executing it now
            skipped["running elsewhere"] += 1
        elif state == DONE:
            skipped["done"] += 1
        elif state == FAILED and not retry_failed:
            skipped["failed"] += 1
        else:
            todo.append(run)
    return todo, skipped


def check_options(options: LaunchOptions) -> None:
    """Reject bad launcher options before anything is written."""
    import torch

    if options.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {options.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if options.workers < 1:
        raise ConfigError(f"--workers {options.workers}: expected at least 1")
    if options.gpus_per_run < 1:
        raise ConfigError(f"--gpus-per-run {options.gpus_per_run}: expected at least 1")
    if options.device.startswith("cuda") and options.launcher != "slurm" and not torch.cuda.is_available():
        raise ConfigError(f"--device {options.device}: this machine has no CUDA GPU; use --device cpu (or leave it "
                          "out), or --launcher slurm to run on GPU nodes")
    on_gpu = torch.cuda.is_available() and not options.device.startswith("cpu")
    if on_gpu and options.launcher != "slurm" and options.gpus_per_run > torch.cuda.device_count():
        raise ConfigError(f"--gpus-per-run {options.gpus_per_run}: this machine has {torch.cuda.device_count()} GPU(s)")


def launch(runs: list[RunRecord], options: LaunchOptions, grid_dir: Path, show_progress: bool = True) -> None:
    """Execute `runs` with the chosen launcher; returns when every run has finished or failed."""
    check_options(options)
    if not runs:
        return
    with GridProgress(runs, enabled=show_progress) as progress:
        if options.launcher == "slurm":
            run_slurm(runs, options, grid_dir, progress)
        else:
            run_processes(runs, options, progress)


# ----------------------------------------------------------------------------------------------
# Child processes: local and parallel
# ----------------------------------------------------------------------------------------------


def process_slots(options: LaunchOptions) -> list[dict[str, str]]:
    """The environment of each concurrent slot: its GPUs (CUDA_VISIBLE_DEVICES) or its CPU threads."""
    import torch

    if options.launcher == "local":
        return [{}]
    on_gpu = torch.cuda.is_available() and not options.device.startswith("cpu")
    # on the CPU, --gpus-per-run N means N gloo processes per run (useful to test the DDP path)
    if on_gpu:
        count, per = torch.cuda.device_count(), options.gpus_per_run
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(s * per, (s + 1) * per))}
                for s in range(count // per)]
    threads = max(1, (os.cpu_count() or 1) // (options.workers * options.gpus_per_run))
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(options.workers)]


def worker_command(run: RunRecord, options: LaunchOptions) -> list[str]:
    """The child's command line. --device passes through ("" or "cuda" give each rank cuda:LOCAL_RANK);
    --grid-pid makes the worker (every rank, under torchrun) exit when the grid process dies."""
    worker = ["-m", "experiments.worker", str(run.directory), "--device", options.device, "--grid-pid", str(os.getpid())]
    if options.gpus_per_run > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={options.gpus_per_run}",
                *worker]
    return [sys.executable, *worker]


def run_processes(runs: list[RunRecord], options: LaunchOptions, progress: "GridProgress") -> None:
    slots = process_slots(options)
    free = list(range(len(slots)))
    queue = list(runs)
    active: dict[int, tuple[subprocess.Popen, RunRecord, object]] = {}
    try:
        while queue or active:
            while queue and free:
                slot, run = free.pop(0), queue.pop(0)
                log = open(run.directory / "run.log", "a")
                env = {**os.environ, **slots[slot], "PYTHONUNBUFFERED": "1"}
                process = subprocess.Popen(worker_command(run, options), stdout=log, stderr=subprocess.STDOUT, env=env)
                active[slot] = (process, run, log)
                progress.start_run(run)
            time.sleep(options.poll_s)
            for slot, (process, run, log) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                _record_exit(run, process.returncode)
                progress.finish_run(run)
                del active[slot]
                free.append(slot)
            progress.refresh()
    finally:  # Ctrl-C: stop the children; their runs stay resumable from their last checkpoint
        for process, _, log in active.values():
            process.terminate()
            process.wait()
            log.close()


def _record_exit(run: RunRecord, returncode: int) -> None:
    """Record how a child ended when it could not record it itself.

    Killed by a signal (returncode -N: kill -9, the out-of-memory killer, a stray Ctrl-C): the run was
    interrupted, not wrong, so it goes back to pending and the next `codetr ablate` resumes it from its
    last checkpoint; killed in MAX_KILLED_ATTEMPTS attempts, it is failed. Any other non-zero exit without
    a recorded end (a crash; under torchrun also a killed rank) is a failed run. A child that found the run
    executing elsewhere (LOCK_BUSY_EXIT) changes nothing.
    """
    from experiments.worker import LOCK_BUSY_EXIT

    status = read_status(run.directory)
    if returncode in (0, LOCK_BUSY_EXIT) or status["state"] in (DONE, FAILED):
        return
    attempts = status.get("attempts", 0)
    if returncode < 0 and attempts < MAX_KILLED_ATTEMPTS:
        update_status(run.directory, state=PENDING,
                      error=f"interrupted by signal {-returncode}; the next `codetr ablate` resumes it")
    elif returncode < 0:  # e.g. the out-of-memory killer, every time
        update_status(run.directory, state=FAILED, finished=time.time(),
                      error=f"killed by signal {-returncode} in {attempts} attempts (out of memory?)")
    else:
        update_status(run.directory, state=FAILED, error=f"worker exited with code {returncode} (see run.log)",
                      finished=time.time())


# ----------------------------------------------------------------------------------------------
# Slurm through submitit
# ----------------------------------------------------------------------------------------------


class SlurmRun:
    """The callable submitted per run. Slurm requeues it on timeout/preemption (submitit's checkpoint
    protocol); the requeued job resumes from the run's last checkpoint."""

    def __call__(self, run_dir: str, device: str = "") -> bool:
        import submitit

        from experiments.worker import execute_run

        from experiments.store import LockBusy

        if submitit.JobEnvironment().num_tasks > 1:
            # one task per GPU: RANK, WORLD_SIZE, MASTER_ADDR and a per-job MASTER_PORT for torch.distributed
            submitit.helpers.TorchDistributedEnvironment().export()
        try:
            return execute_run(Path(run_dir), device)
        except LockBusy:  # a duplicate submission while the run executes elsewhere
            return False

    def checkpoint(self, run_dir: str, device: str = ""):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmRun(), run_dir, device)


def slurm_executor(options: LaunchOptions, grid_dir: Path):
    import submitit

    executor = submitit.AutoExecutor(folder=grid_dir / "slurm" / "%j")
    gpus = options.gpus_per_run if executor.cluster == "slurm" else 0
    executor.update_parameters(timeout_min=options.slurm_time_min, tasks_per_node=max(1, gpus), nodes=1)
    if executor.cluster == "slurm":
        executor.update_parameters(slurm_partition=options.slurm_partition or None, gpus_per_node=gpus,
                                   cpus_per_task=options.slurm_cpus_per_task, slurm_signal_delay_s=120)
    return executor


def run_slurm(runs: list[RunRecord], options: LaunchOptions, grid_dir: Path, progress: "GridProgress") -> None:
    executor = slurm_executor(options, grid_dir)
    if executor.cluster != "slurm":
        progress.note("no Slurm on this machine (no sbatch): submitit's local executor runs all jobs at once, "
                      "on the CPU (meant for testing; use --launcher parallel on a workstation)")
    jobs = executor.map_array(SlurmRun(), [str(run.directory) for run in runs], [options.device] * len(runs))
    pending = dict(zip((job.job_id for job in jobs), zip(jobs, runs)))
    for run in runs:
        progress.start_run(run)
    while pending:
        time.sleep(options.poll_s)
        for job_id, (job, run) in list(pending.items()):
            if job.done():
                try:
                    job.result()
                except Exception as error:  # noqa: BLE001 - a job that died outside execute_run
                    if read_status(run.directory)["state"] not in (DONE, FAILED):
                        from experiments.worker import error_line

                        update_status(run.directory, state=FAILED, error=f"slurm job {job_id}: {error_line(error)}")
                progress.finish_run(run)
                del pending[job_id]
        progress.refresh()


# ----------------------------------------------------------------------------------------------
# Progress: a grid bar plus one bar per active run
# ----------------------------------------------------------------------------------------------


class IterationCounter:
    """Counts a run's logged training iterations, reading only what was appended since the last call."""

    def __init__(self, run_dir: Path):
        self.log = run_dir / "log.jsonl"
        self.offset = 0
        self.count = 0

    def __call__(self) -> int:
        if not self.log.exists():
            return 0
        with open(self.log, "rb") as f:
            if f.seek(0, os.SEEK_END) < self.offset:  # truncated by a resume: count afresh
                self.offset, self.count = 0, 0
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is counted next time
        self.offset += len(complete)
        self.count += sum(b'"time"' in line and b'"event"' not in line for line in complete.splitlines())
        return self.count


class GridProgress:
    """A rich display: `grid  3/8 runs` and, for each active run, its iterations from its log.jsonl."""

    def __init__(self, runs: list[RunRecord], enabled: bool = True):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)
        self.grid_task = self.progress.add_task("[bold]grid[/] runs", total=len(runs))
        self.run_tasks: dict[Path, tuple[int, IterationCounter]] = {}

    def __enter__(self) -> "GridProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def note(self, text: str) -> None:
        self.progress.console.print(text, soft_wrap=True, highlight=False)

    def start_run(self, run: RunRecord) -> None:
        task = self.progress.add_task(f"  {escape(run.name)}", total=None)
        self.run_tasks[run.directory] = (task, IterationCounter(run.directory))

    def finish_run(self, run: RunRecord) -> None:
        self.refresh()
        entry = self.run_tasks.pop(run.directory, None)
        if entry is not None:
            self.progress.remove_task(entry[0])
        status = read_status(run.directory)
        outcome = {DONE: "[green]done[/]", FAILED: f"[red]failed[/]: {escape(str(status.get('error')))}"}.get(status["state"], status["state"])
        self.progress.console.print(f"{escape(run.name)}: {outcome}", highlight=False, soft_wrap=True)
        self.progress.advance(self.grid_task)

    def refresh(self) -> None:
        for run_dir, (task, counter) in self.run_tasks.items():
            self.progress.update(task, total=read_status(run_dir).get("total_iters"), completed=counter())

