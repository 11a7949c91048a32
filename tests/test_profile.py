"""Training-cost profile: the helpers, a tiny config in-process, and `codetr profile` end to end (one
subprocess per config). Timings are only checked for sanity (positive, the median of what was timed)."""
import csv
import json
import math
import statistics

import pytest
import torch

from analysis.profile import parse_size, profile_configs, time_iterations
from codetr.config import apply_overrides, get_preset
from codetr.errors import ConfigError
from tests.test_cli import assert_one_line_error, codetr

SMALL = ["model.num_queries=20", "model.num_detections=20"]


def test_parse_size():
    assert parse_size("256x320") == (256, 320)
    for bad in ("256", "axb", "16x16"):
        with pytest.raises(ConfigError, match="--size"):
            parse_size(bad)


def test_time_iterations_runs_warmup_then_times_each_iteration():
    calls = []
    times = time_iterations(lambda: calls.append(1), torch.device("cpu"), iters=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_profile_in_process_tiny_config():
    cfg = apply_overrides(get_preset("tiny"), SMALL)
    (row,) = profile_configs([("tiny", cfg)], (64, 64), batch=1, iters=2, warmup=0, num_classes=3, isolate=False,
                             progress=False)
    assert (row.config, row.method, row.k, row.heads, row.size, row.batch, row.memory) == (
        "tiny", "deformable_detr", 0, "-", "64x64", 1, "cpu_peak_rss")
    assert len(row.times) == 2 and all(t > 0 for t in row.times)
    assert math.isclose(row.seconds_per_iter, statistics.median(row.times), rel_tol=1e-12)
    assert row.x_baseline == 1.0 and row.peak_mb >= row.peak_mb_before_model > 0 and row.params_m > 1


def test_cli_profile_end_to_end(cli_env, tmp_path):
    result = codetr("profile", "--preset", "tiny", "--preset", "co_tiny_pp", *[a for s in SMALL for a in ("--set", s)],
                    "--size", "64x64", "--batch", "1", "--iters", "1", "--warmup", "0", "--num-classes", "3",
                    "--out", tmp_path, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "x baseline" in result.stdout and "atss+faster_rcnn" in result.stdout
    with open(tmp_path / "profile.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["config"], r["method"], r["k"], r["heads"]) for r in rows] == [
        ("tiny", "deformable_detr", "0", "-"), ("co_tiny_pp", "co_detr", "2", "atss+faster_rcnn")]
    records = json.loads((tmp_path / "profile.json").read_text())
    assert all(r["seconds_per_iter"] > 0 and r["peak_mb"] > 0 for r in records)
    assert records[0]["x_baseline"] == 1.0
    assert math.isclose(records[1]["x_baseline"], records[1]["seconds_per_iter"] / records[0]["seconds_per_iter"],
                        rel_tol=1e-12)
    assert records[1]["params_m"] > records[0]["params_m"]  # the auxiliary heads' parameters


def test_cli_profile_bad_input(cli_env):
    result = codetr("profile", "--preset", "tiny", "--size", "big", env=cli_env)
    assert_one_line_error(result, "--size 'big'", "HEIGHTxWIDTH")
