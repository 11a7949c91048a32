"""Issue 15, defect 9: the metrics / detections pair cannot silently mismatch, renames reach the disk, equal grid
values run once, and Ctrl-C says how to resume."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codetr.engine.evaluate import check_eval_outputs, write_eval_outputs
from codetr.errors import DataError
from codetr.io import atomic_write_json
from experiments.ablate import Schedule, grid_from_flags, resolve_base
from experiments.grid import drop_duplicate_points

DETECTION = {"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}


def test_a_kill_between_the_two_eval_files_is_detected(tmp_path: Path, monkeypatch) -> None:
    metrics_path, detections_path = write_eval_outputs(tmp_path, {"AP": 0.5}, [DETECTION])
    check_eval_outputs(metrics_path, detections_path)  # a complete pair
    assert json.loads(metrics_path.read_text())["AP"] == 0.5

    import codetr.engine.evaluate as evaluate_module

    def killed(*args, **kwargs):  # the process dies after the detections, before metrics.json
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        write_eval_outputs(tmp_path, {"AP": 0.9}, [DETECTION, {**DETECTION, "score": 0.9}])
    assert json.loads(metrics_path.read_text())["AP"] == 0.5  # the old metrics ...
    assert len(json.loads(detections_path.read_text())) == 2  # ... beside the new detections
    with pytest.raises(DataError, match="is not the detections .* was computed from"):
        check_eval_outputs(metrics_path, detections_path)


def test_atomic_writes_fsync_the_folder_after_the_rename(tmp_path: Path, monkeypatch) -> None:
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write_json(tmp_path / "status.json", {"state": "done"})
    assert synced == [False, True]  # the file's data, then the folder holding the new name


def test_equal_values_of_a_grid_parameter_run_once() -> None:
    spec, base = resolve_base(grid_from_flags([("lambda1", "1,1.0,1e0,2")]), Schedule(), None)
    kept, notes = drop_duplicate_points(spec, base)
    assert [point.label() for point in kept.points] == ["lambda1=1", "lambda1=2"]
    assert len(notes) == 2 and "lambda1=1.0 is the same config as lambda1=1" in notes[0]


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_resume(synth_root: Path, tmp_path: Path, cli_env: dict) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "cli", "train", "--data", str(synth_root), "--out", str(out), "--epochs", "50",
               "--set", "data.train_scales=[128]", "--set", "data.max_size=160", "--set", "data.batch_size=1",
               "--set", "train.checkpoint_every=2"]
    process = subprocess.Popen(command, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.pt").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; continue from the last checkpoint with: codetr train ")
    assert last.endswith(" --resume") and str(out) in last
