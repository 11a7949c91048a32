"""DINO and Co-DINO through the `codetr` commands on the generated data: train, eval, conflicts, iof-iob,
positives (the issue's "done when"), with a few iterations at small size."""
import json
import os

import pytest

from tests.test_cli import FAST, codetr

SMALL = ["--set", "data.train_scales=[128]", "--set", "data.max_size=160", "--set", "data.test_size=128",
         "--set", "data.test_max_size=160", "--set", "data.augment=false", "--set", "data.batch_size=2"]


@pytest.fixture(scope="module")
def co_dino_run(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("co_dino")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = codetr("train", "--preset", "co_dino_tiny", "--data", synth_root, "--epochs", "1", "--out", out, *FAST,
                    *SMALL, "--set", "train.max_iters_per_epoch=3", "--set", "model.denoising.num_queries=10", env=env)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_co_dino_train_eval_and_analyses(co_dino_run, synth_root, cli_env, tmp_path):
    steps = [json.loads(line) for line in (co_dino_run / "log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "event" not in s]
    assert len(steps) == 3
    for name in ("dec.d2.loss_cls", "enc.loss_giou", "dn.d0.loss_bbox", "aux.atss.loss_centerness",
                 "aux.faster_rcnn.loss_rpn_cls", "posq.faster_rcnn.d2.loss_giou"):
        assert name in steps[0], name
    result = codetr("eval", "--ckpt", co_dino_run / "last.pt", "--data", synth_root, "--out", tmp_path / "eval", env=cli_env)
    assert result.returncode == 0, result.stderr
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert 0 < len(detections) <= 8 * 20  # 8 val images, 20 detections each before soft-NMS drops any
    result = codetr("conflicts", "--ckpt", co_dino_run / "last.pt", "--data", synth_root, "--num-images", "2",
                    "--overlays", "1", "--out", tmp_path / "conf", env=cli_env)
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "conf" / "conflicts.csv").read_text()
    assert "atss" in table and "faster_rcnn" in table
    result = codetr("iof-iob", "--ckpt", co_dino_run / "last.pt", "--data", synth_root, "--num-images", "2",
                    "--out", tmp_path / "iof", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "iof" / "iof_iob.png").exists()
    result = codetr("positives", "--preset", "co_dino_tiny", "--ckpt", co_dino_run / "last.pt", "--data", synth_root,
                    "--num-images", "2", "--out", tmp_path / "pos", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert {"atss", "faster_rcnn"} <= {row["head"] for row in json.loads((tmp_path / "pos" / "positives.json").read_text())["heads"]}


@pytest.mark.slow
def test_dino_train_and_eval(synth_root, cli_env, tmp_path):
    out = tmp_path / "dino"
    result = codetr("train", "--preset", "dino_tiny", "--data", synth_root, "--epochs", "1", "--out", out, *FAST, *SMALL,
                    "--set", "train.max_iters_per_epoch=2", env=cli_env)
    assert result.returncode == 0, result.stderr
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("dn.d2.loss_cls" in s for s in steps) and not any(k.startswith("aux.") for s in steps for k in s)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50"} <= set(metrics)
    result = codetr("eval", "--ckpt", out / "last.pt", "--data", synth_root, "--out", tmp_path / "eval", env=cli_env)
    assert result.returncode == 0, result.stderr
    result = codetr("iof-iob", "--ckpt", out / "last.pt", "--data", synth_root, "--num-images", "2",
                    "--out", tmp_path / "iof", env=cli_env)
    assert result.returncode == 0, result.stderr
