"""`codetr convert` and every `--ckpt` on a released Sense-X checkpoint, end to end (CPU-sized variant).

The foreign file has the mmcv 1.x layout of a Sense-X release (state_dict + meta with CLASSES, config text
and a numpy seed + optimizer) and the released key names at reduced dims (tests/test_convert_sensex_keys.py
TINY). Its classes are the generated dataset's, so with ids 1..N the commands run against a copy of that
dataset whose category ids are renumbered 1..N.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from codetr.data.synth import CATEGORIES
from tests.test_convert_sensex_keys import TINY, random_state_dict

REPO = Path(__file__).resolve().parents[1]


def codetr(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)


@pytest.fixture(scope="module")
def sensex_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sensex") / "co_deformable_detr_tiny.pth"
    torch.save({
        "meta": {"mmdet_version": "2.25.3", "CLASSES": tuple(name for _, name in CATEGORIES), "epoch": 12,
                 "config": "model = dict(type='CoDETR')", "seed": np.int64(7), "iter": np.int64(100)},
        "state_dict": random_state_dict(TINY, seed=1),
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": []}]},
    }, path)
    return path


@pytest.fixture(scope="module")
def renumbered_root(synth_root, tmp_path_factory) -> Path:
    """The generated dataset with category ids 1..N (images linked, annotations rewritten)."""
    root = tmp_path_factory.mktemp("renumbered")
    (root / "annotations").mkdir()
    new_id = {cid: i for i, (cid, _) in enumerate(CATEGORIES, start=1)}
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(synth_root / split)
        data = json.loads((synth_root / "annotations" / f"instances_{split}.json").read_text())
        for category in data["categories"]:
            category["id"] = new_id[category["id"]]
        for annotation in data["annotations"]:
            annotation["category_id"] = new_id[annotation["category_id"]]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_convert_writes_a_codetr_checkpoint(sensex_file, tmp_path, cli_env):
    from codetr.convert import convert_file
    from codetr.engine.inference import load_detector

    out = tmp_path / "converted.pt"
    proc = codetr(["convert", sensex_file, "--out", out], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "converted" in proc.stderr and "(sensex)" in proc.stderr and "auxiliary heads atss+faster_rcnn" in proc.stderr
    assert "skipped 20 BatchNorm num_batches_tracked counters" in proc.stderr
    assert "downsample" not in proc.stderr and "not read: optimizer" in proc.stderr  # the bias is carried
    detector = load_detector(out, deploy=False)
    assert detector.cat_ids == [1, 2, 3, 4, 5, 6] and detector.class_names[0] == "circle" and detector.epoch == 12
    expected = convert_file(sensex_file).checkpoint["model"]
    assert all(torch.equal(v, expected[k]) for k, v in detector.model.state_dict().items())
    # the same file with --from given, and a converted (codetr) file again
    assert codetr(["convert", sensex_file, "--from", "sensex", "--out", tmp_path / "again.pt"], cli_env).returncode == 0
    assert "already a codetr checkpoint" in one_error_line(codetr(["convert", out, "--out", tmp_path / "x.pt"], cli_env))
    line = one_error_line(codetr(["convert", out, "--from", "sensex", "--out", tmp_path / "x.pt"], cli_env))
    assert "no codetr counterpart: backbone.stem.0.weight" in line, line


def test_commands_take_the_foreign_file(sensex_file, renumbered_root, synth_root, tmp_path, cli_env):
    small = ["--set", "data.test_size=160", "--set", "data.test_max_size=200"]
    proc = codetr(["eval", "--ckpt", sensex_file, "--data", renumbered_root, "--out", tmp_path / "eval", *small], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "AP" in json.loads((tmp_path / "eval" / "metrics.json").read_text())
    image = next((synth_root / "val2017").glob("*.png"), None) or next((synth_root / "val2017").iterdir())
    proc = codetr(["predict", "--ckpt", sensex_file, "--image", image, "--out", tmp_path / "pred.png"], cli_env)
    assert proc.returncode == 0 and (tmp_path / "pred.png").is_file(), proc.stderr
    proc = codetr(["conflicts", "--ckpt", sensex_file, "--data", renumbered_root, "--out", tmp_path / "conf",
                   "--num-images", "1", "--overlays", "0"], cli_env)
    assert proc.returncode == 0 and (tmp_path / "conf" / "conflicts.csv").is_file(), proc.stderr
    proc = codetr(["iof-iob", "--ckpt", sensex_file, "--data", renumbered_root, "--out", tmp_path / "iof",
                   "--num-images", "1", "--variant", "encoder"], cli_env)
    assert proc.returncode == 0, proc.stderr
    proc = codetr(["positives", "--ckpt", sensex_file, "--data", renumbered_root, "--num-images", "1", *small], cli_env)
    assert proc.returncode == 0 and "atss" in proc.stdout and "faster_rcnn" in proc.stdout, proc.stdout + proc.stderr


def test_bad_inputs_exit_2_naming_the_keys(sensex_file, tmp_path, cli_env):
    import torchvision

    classifier = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), classifier)
    line = one_error_line(codetr(["convert", classifier, "--out", tmp_path / "x.pt"], cli_env))
    assert "unmapped keys: conv1.weight, bn1.weight" in line, line
    line = one_error_line(codetr(["eval", "--ckpt", classifier], cli_env))
    assert "unmapped keys: conv1.weight" in line, line
    co_dino = tmp_path / "co_dino.pth"
    state = random_state_dict(TINY)
    state["query_head.label_embedding.weight"] = torch.zeros(TINY.num_classes, TINY.d_model)
    torch.save({"state_dict": state, "meta": {}}, co_dino)
    line = one_error_line(codetr(["convert", co_dino, "--out", tmp_path / "x.pt"], cli_env))
    assert "no codetr counterpart: query_head.label_embedding.weight" in line, line
    assert one_error_line(codetr(["convert", sensex_file, "--from", "mmdet3", "--out", tmp_path / "x.pt"], cli_env))
    assert "--from 'detectron2'" in one_error_line(codetr(["convert", sensex_file, "--from", "detectron2", "--out",
                                                           tmp_path / "x.pt"], cli_env))
    assert not (tmp_path / "x.pt").exists()
