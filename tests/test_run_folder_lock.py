"""Issue 15, defects 1 and 2: one process trains into a folder, a killed trainer's DataLoader workers do not keep
its lock, and `codetr ablate` counts every unfinished run of the grid in its exit code."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codetr.engine.folder_lock import RunFolderLock, is_locked
from experiments.ablate import Schedule, grid_from_flags, resolve_base, run_grid
from experiments.store import RunLock, open_grid

pytestmark = pytest.mark.slow

SMALL = ["--epochs", "1", "--set", "data.train_scales=[160]", "--set", "data.max_size=200", "--set", "data.batch_size=1",
         "--set", "data.test_size=160", "--set", "data.test_max_size=200"]


def train_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "train", "--data", str(data), "--out", str(out), *SMALL, *extra]


def logged_steps(out: Path) -> list[int]:
    log = out / "log.jsonl"
    if not log.exists():
        return []
    return [json.loads(line)["step"] for line in log.read_text().splitlines() if '"time"' in line]


def wait_for_steps(out: Path, count: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while len(logged_steps(out)) < count:
        assert process.poll() is None, "training ended before the test could interfere"
        assert time.time() < deadline, f"{out} logged no {count} steps in {timeout_s} s"
        time.sleep(0.05)


def test_a_second_train_on_the_same_out_is_refused(synth_root: Path, tmp_path: Path, cli_env: dict) -> None:
    out = tmp_path / "run"
    first = subprocess.Popen(train_command(synth_root, out, "--epochs", "100"), env=cli_env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(out, 1, first)
        second = subprocess.run(train_command(synth_root, out, "--set", "train.seed=1"), env=cli_env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr
        assert str(out) in lines[0] and f"another process (pid {first.pid})" in lines[0]
        wait_for_steps(out, 3, first)
    finally:
        first.kill()
        first.wait()
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1))  # one writer: 1, 2, 3, ... (was 1, 1, 2, 2, 3, 3)
    assert json.loads((out / "config.json").read_text())["train"]["seed"] != 1  # the first run's config, not the refused one's


def test_dataloader_workers_of_a_killed_trainer_do_not_keep_its_lock(synth_root: Path, tmp_path: Path,
                                                                      cli_env: dict) -> None:
    out = tmp_path / "run"
    trainer = subprocess.Popen(train_command(synth_root, out, "--set", "data.num_workers=2"), env=cli_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_steps(out, 1, trainer)
    workers = subprocess.run(["pgrep", "-P", str(trainer.pid)], capture_output=True, text=True).stdout.split()
    assert workers, "the trainer has no DataLoader worker processes"
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    alive = [pid for pid in map(int, workers) if os.path.exists(f"/proc/{pid}")]
    locked = is_locked(out)
    for pid in alive:  # they notice their parent's death within seconds on their own; don't wait for it
        os.kill(pid, signal.SIGKILL)
    assert not locked, f"the lock of the killed trainer is still held (its workers {alive} inherited it)"


def test_forked_children_do_not_inherit_the_lock(tmp_path: Path) -> None:
    """The same property without a trainer: a child forked while the lock is held does not hold it."""
    script = (
        "import os, sys, time\n"
        "from codetr.engine.folder_lock import RunFolderLock\n"
        f"RunFolderLock({str(tmp_path)!r}).acquire()\n"
        "if os.fork() == 0:  # the fork hooks have run once fork returns in the child\n"
        "    print(os.getpid(), flush=True); time.sleep(60); os._exit(0)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        assert is_locked(tmp_path)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert os.path.exists(f"/proc/{child}")  # the child lives on ...
        assert not is_locked(tmp_path)  # ... without the lock
        with RunFolderLock(tmp_path, retry_s=0):  # which can be taken at once
            assert is_locked(tmp_path)
    finally:
        os.kill(child, signal.SIGKILL)


def test_ablate_counts_runs_executing_elsewhere_as_unfinished(synth_root: Path, tmp_path: Path) -> None:
    spec = grid_from_flags([("lambda1", "0.5,1")])
    schedule = Schedule(epochs=1, max_iters=2)
    resolved, base = resolve_base(spec, schedule, synth_root)
    runs = open_grid(tmp_path, resolved, base)
    holder_script = (
        "import sys, time\nfrom experiments.store import RunLock\n"
        + "".join(f"RunLock({str(run.directory)!r}).acquire()\n" for run in runs)
        + "print('ready', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        table = run_grid(spec, tmp_path, schedule, synth_root, show_progress=False, log=lambda text: None)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(table.unfinished) == sorted(run.name for run in runs)  # was [] and exit code 0
    with RunLock(runs[0].directory, retry_s=0):  # the holder's death freed them
        pass


def test_lock_is_reentrant_in_one_process_and_refused_across_processes(tmp_path: Path) -> None:
    with RunLock(tmp_path, retry_s=0):
        with RunFolderLock(tmp_path, retry_s=0):  # a grid worker, then its Trainer
            assert is_locked(tmp_path)
        assert is_locked(tmp_path)  # the inner release keeps the outer hold
        probe = subprocess.run([sys.executable, "-c", "from codetr.engine.folder_lock import RunFolderLock\n"
                                f"RunFolderLock({str(tmp_path)!r}, retry_s=0).acquire()"],
                               capture_output=True, text=True)
        assert probe.returncode == 1 and f"another process (pid {os.getpid()})" in probe.stderr
    assert not is_locked(tmp_path)
