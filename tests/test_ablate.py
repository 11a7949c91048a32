"""`codetr ablate` end to end on the generated data: a 2-point grid, SIGKILL and resume, a failing run,
and the slurm launcher through submitit's local executor. Runs are tiny (4 iterations at 160 px)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.store import grid_runs, is_locked, read_status

pytestmark = pytest.mark.slow

SMALL = ["--max-iters", "4", "--set", "data.train_scales=[160]", "--set", "data.max_size=200", "--set",
         "data.test_size=160", "--set", "data.test_max_size=200", "--set", "data.batch_size=2", "--set",
         "train.checkpoint_every=2"]


# One epoch, one run at a time: what these tests check (kills, resumes) is about the local launcher.
ONE_AT_A_TIME = ["--epochs", "1", "--launcher", "local"]


def ablate_command(synth_root, out, *extra):
    return [sys.executable, "-m", "cli", "ablate", "--param", "lambda1", "--values", "0.5,1", "--data", str(synth_root),
            *SMALL, *ONE_AT_A_TIME, "--out", str(out), *extra]


def final_metrics(grid_dir):
    _, runs = grid_runs(grid_dir)
    return {run.name: run.status()["metrics"] for run in runs}


def wait_until_logged(run_dir, iterations: int, grid: subprocess.Popen, deadline: float) -> None:
    """Wait until the run's log.jsonl has `iterations` iteration records, while the grid still runs."""
    log = run_dir / "log.jsonl"
    while not (log.exists() and sum('"time"' in line for line in log.read_text().splitlines()) >= iterations):
        assert grid.poll() is None, "the grid finished before the run could be killed"
        assert time.time() < deadline, f"{run_dir} did not log {iterations} iterations in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference_grid(synth_root, tmp_path_factory):
    """The uninterrupted 2-point grid (and its CLI output)."""
    out = tmp_path_factory.mktemp("reference") / "grid"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(ablate_command(synth_root, out), capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_two_point_grid_end_to_end(reference_grid):
    out, result = reference_grid
    assert "2 runs (2 points x 1 seeds); 2 to run" in result.stderr
    assert "lambda1" in result.stdout and "ΔAP" in result.stdout and "1 *" in result.stdout  # baseline marked
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"] == ["lambda1"] and manifest["baseline"] == {"lambda1": "1"} and manifest["version"]
    for name in ("lambda1=0.5__seed0", "lambda1=1__seed0"):
        status = read_status(out / name)
        assert status["state"] == "done" and status["attempts"] == 1
        assert set(status["metrics"]) >= {"AP", "AP50", "APl"} and status["sec_per_iter"] > 0 and status["peak_mem_mb"] > 0
        assert (out / name / "last.pt").exists() and (out / name / "metrics.json").exists()
        run = json.loads((out / name / "run.json").read_text())
        assert run["config"]["optim"]["epochs"] == 1 and run["config"]["train"]["max_iters_per_epoch"] == 4
    csv = (out / "results.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[1].startswith("0.5,")
    assert (out / "plot_AP.png").stat().st_size > 1000


def test_sigkill_mid_run_then_rerun_resumes_with_identical_results(reference_grid, synth_root, tmp_path):
    out = tmp_path / "grid"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    grid = subprocess.Popen(ablate_command(synth_root, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    second = out / "lambda1=1__seed0"
    deadline = time.time() + 300
    wait_until_logged(second, 3, grid, deadline)  # it checkpointed mid-epoch (iteration 2 of 4)
    os.kill(grid.pid, signal.SIGKILL)
    grid.wait()
    while is_locked(second):  # the worker notices its parent died and exits
        assert time.time() < deadline
        time.sleep(0.1)
    assert read_status(out / "lambda1=0.5__seed0")["state"] == "done"
    assert read_status(second)["state"] == "running"  # interrupted: no process holds its lock
    first_checkpoint_time = (out / "lambda1=0.5__seed0" / "last.pt").stat().st_mtime

    rerun = subprocess.run(ablate_command(synth_root, out), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 to run, skipping 1 done" in rerun.stderr
    assert (out / "lambda1=0.5__seed0" / "last.pt").stat().st_mtime == first_checkpoint_time  # not re-run
    assert read_status(out / "lambda1=0.5__seed0")["attempts"] == 1
    assert read_status(second)["attempts"] == 2
    # resumed, not restarted: the log has each of the 4 iterations exactly once
    iterations = [json.loads(line)["iter"] for line in (second / "log.jsonl").read_text().splitlines() if '"time"' in line]
    assert iterations == [0, 1, 2, 3]
    assert final_metrics(out) == final_metrics(reference_grid[0])  # exact: resume is deterministic


def test_a_run_killed_by_a_signal_is_resumed_by_the_next_ablate(reference_grid, synth_root, tmp_path):
    """kill -9 of one run's worker (as the out-of-memory killer would): the grid finishes the other run,
    exits 1 naming the unfinished one, and the next `ablate` resumes it to the uninterrupted results."""
    out = tmp_path / "grid"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    grid = subprocess.Popen(ablate_command(synth_root, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    first = out / "lambda1=0.5__seed0"
    wait_until_logged(first, 3, grid, time.time() + 300)  # it checkpointed mid-epoch (iteration 2 of 4)
    os.kill(read_status(first)["pid"], signal.SIGKILL)
    stdout, stderr = grid.communicate(timeout=600)
    assert grid.returncode == 1, stderr
    assert "1 run(s) did not finish (lambda1=0.5__seed0)" in stderr
    assert read_status(first)["state"] == "pending" and "signal 9" in read_status(first)["error"]
    assert read_status(out / "lambda1=1__seed0")["state"] == "done"

    rerun = subprocess.run(ablate_command(synth_root, out), capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "1 to run, skipping 1 done" in rerun.stderr
    assert read_status(first)["state"] == "done" and read_status(first)["attempts"] == 2
    assert final_metrics(out) == final_metrics(reference_grid[0])  # resumed from its checkpoint, exactly


def test_failing_run_is_recorded_and_the_others_finish(synth_root, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("points:\n  - {lambda1: 1}\n  - {lambda1: 1, model.backbone.pretrained: /nonexistent/r18.pth}\n")
    out = tmp_path / "grid"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "cli", "ablate", "--grid", str(spec), "--data", str(synth_root), *SMALL, *ONE_AT_A_TIME,
               "--max-iters", "2", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 1
    assert "1 run(s) failed" in result.stderr and "--retry-failed" in result.stderr
    _, runs = grid_runs(out)
    states = {run.name: run.status() for run in runs}
    assert states["lambda1=1__seed0"]["state"] == "done"
    (failed_name,) = [name for name in states if name.startswith("lambda1=1__model.backbone.pretrained=")]
    failed = states[failed_name]
    assert failed["state"] == "failed" and "/nonexistent/r18.pth" in failed["error"]
    assert "failed at lambda1=1, model.backbone.pretrained=/nonexistent/r18.pth" in (out / "results.md").read_text()

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert "0 to run, skipping 1 done, 1 failed (pass --retry-failed" in again.stderr
    retried = subprocess.run(command + ["--retry-failed"], capture_output=True, text=True, env=env, timeout=600)
    assert "1 to run" in retried.stderr and retried.returncode == 1
    assert grid_runs(out)[1][1].status()["attempts"] == 2


def test_bad_grid_fails_before_anything_runs(tmp_path, cli_env):
    out = tmp_path / "grid"
    result = subprocess.run([sys.executable, "-m", "cli", "ablate", "--param", "lambda1", "--values", "0.5,x",
                             "--out", str(out)], capture_output=True, text=True, env=cli_env, timeout=120)
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.strip().splitlines() == ["error: grid point lambda1=x: model.aux.lambda1='x': expected a number"]


def test_slurm_launcher_through_submitit_local_executor(synth_root, tmp_path, monkeypatch):
    from experiments.ablate import Schedule, grid_from_flags, run_grid
    from experiments.launchers import LaunchOptions

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = grid_from_flags([("lambda1", "0.5")], overrides=[a for a in SMALL[3::2]])
    table = run_grid(spec, tmp_path / "grid", Schedule(epochs=1, max_iters=2), synth_root,
                     LaunchOptions(launcher="slurm", poll_s=0.2), show_progress=False, log=lambda text: None)
    status = read_status(tmp_path / "grid" / "lambda1=0.5__seed0")
    assert status["state"] == "done", status
    assert table.points["seeds_done"].tolist() == [1]
    assert list((tmp_path / "grid" / "slurm").glob("*/*_log.out"))  # submitit's job folder


def test_parallel_launcher_runs_points_concurrently(synth_root, tmp_path):
    from experiments.ablate import Schedule, grid_from_flags, run_grid
    from experiments.launchers import LaunchOptions

    spec = grid_from_flags([("lambda1", "0.5,2")], overrides=[a for a in SMALL[3::2]])
    table = run_grid(spec, tmp_path / "grid", Schedule(epochs=1, max_iters=2), synth_root,
                     LaunchOptions(launcher="parallel", workers=2, device="cpu", poll_s=0.2), show_progress=False,
                     log=lambda text: None)
    assert table.points["seeds_done"].tolist() == [1, 1]
    first, second = (read_status(tmp_path / "grid" / f"lambda1={v}__seed0") for v in ("0.5", "2"))
    assert first["started"] < second["finished"] and second["started"] < first["finished"]  # overlapping


def test_run_with_two_processes_goes_through_torchrun(synth_root, tmp_path):
    """`--gpus-per-run 2` with `--device cpu`: torchrun starts 2 gloo processes; each rank sees half the
    16 training images, so a full epoch at batch 2 is 4 iterations instead of 8."""
    from experiments.ablate import Schedule, grid_from_flags, run_grid
    from experiments.launchers import LaunchOptions

    spec = grid_from_flags([("lambda1", "1")], overrides=[a for a in SMALL[3::2]])
    run_grid(spec, tmp_path / "grid", Schedule(epochs=1, max_iters=0), synth_root,
             LaunchOptions(gpus_per_run=2, device="cpu", poll_s=0.2), show_progress=False, log=lambda text: None)
    status = read_status(tmp_path / "grid" / "lambda1=1__seed0")
    assert status["state"] == "done", status
    assert status["iters_per_epoch"] == 4
