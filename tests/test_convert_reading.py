"""Safe reading of released checkpoints (codetr/convert/reading.py).

The synthetic files reproduce the structure of real ones: mmengine / mmdet 3.x (`meta` with numpy scalars
and `dataset_meta`, `message_hub` holding mmengine HistoryBuffer objects with numpy arrays, optimizer and
scheduler state) and mmcv 1.x / Sense-X (`meta` with CLASSES, config text, numpy seed; optimizer). mmengine
is not installed here: its classes are faked for saving only, then removed, as on a user's machine.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from codetr.convert.coco import COCO_CLASS_NAMES
from codetr.convert.reading import ForeignObject, read_foreign_checkpoint
from codetr.errors import CheckpointError


def _fake_module_class(monkeypatch, qualified: str, body: dict | None = None) -> type:
    """A class importable as `qualified` while the test runs (pickle checks it can find what it saves)."""
    module_name, name = qualified.rsplit(".", 1)
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (), {"__module__": module_name, **(body or {})})
    setattr(sys.modules[module_name], name, cls)
    return cls


def _state_dict() -> dict[str, torch.Tensor]:
    return collections.OrderedDict([("backbone.conv1.weight", torch.randn(4, 3, 3, 3)),
                                    ("backbone.bn1.num_batches_tracked", torch.tensor(7))])


def mmengine_checkpoint(path: Path, monkeypatch) -> dict[str, torch.Tensor]:
    """An mmdet 3.x / mmengine-format file; returns its state dict."""
    history_buffer = _fake_module_class(monkeypatch, "mmengine.logging.history_buffer.HistoryBuffer")
    buffer = history_buffer()
    buffer.max_length = 1000000
    buffer._log_history = np.array([0.5, 0.25])
    buffer._count_history = np.array([1, 1])
    state = _state_dict()
    torch.save({
        "meta": {"epoch": 12, "iter": np.int64(87960), "seed": np.int64(1234), "cfg": "model = dict(type='DINO')",
                 "experiment_name": "x", "time": "20240101", "mmengine_version": "0.10.3",
                 "dataset_meta": {"classes": COCO_CLASS_NAMES, "palette": [(220, 20, 60)] * 80}},
        "state_dict": state,
        "message_hub": {"log_scalars": {"train/lr": buffer, "train/loss": buffer},
                        "runtime_info": {"epoch": 12, "iter": 87960, "max_epochs": 12, "loss_scale": np.float32(512.0)},
                        "resumed_keys": {"epoch": True}},
        "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(4)}},
                      "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999), "weight_decay": 1e-4, "params": [0]}]},
        "param_schedulers": [{"milestones": collections.Counter({11: 1}), "gamma": 0.1, "last_step": 12}],
    }, path)
    for name in [m for m in sys.modules if m == "mmengine" or m.startswith("mmengine.")]:
        monkeypatch.delitem(sys.modules, name)
    return state


def mmcv1_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A Sense-X / mmdet 2.x (mmcv 1.x save_checkpoint) file; returns its state dict."""
    state = _state_dict()
    torch.save({
        "meta": {"mmdet_version": "2.25.3", "CLASSES": ("circle", "square"), "env_info": "sys.platform: linux",
                 "config": "model = dict(type='CoDETR')", "seed": np.int64(7), "exp_name": "co_deformable_detr",
                 "epoch": 12, "iter": 87960, "hook_msgs": {"last_ckpt": "work_dirs/epoch_12.pth"},
                 "lr": np.array([2e-5, 2e-6]), "dtype": np.dtype("float32")},
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 2e-5, "params": [0, 1]}]},
    }, path)
    return state


def test_mmengine_checkpoint_is_read_without_mmengine(tmp_path, monkeypatch):
    path = tmp_path / "mmdet3.pth"
    state = mmengine_checkpoint(path, monkeypatch)
    assert "mmengine" not in sys.modules
    with pytest.raises(Exception):  # weights_only alone refuses it: the allow-list is what makes it readable
        torch.load(path, weights_only=True)
    read = read_foreign_checkpoint(path)
    assert list(read.state_dict) == list(state)
    assert all(torch.equal(read.state_dict[k], v) for k, v in state.items())
    assert tuple(read.meta["dataset_meta"]["classes"]) == COCO_CLASS_NAMES
    assert read.meta["seed"] == 1234 and isinstance(read.meta["seed"], np.integer)
    assert read.skipped == ["message_hub", "optimizer", "param_schedulers"]
    assert read.stand_ins == ["mmengine.logging.history_buffer.HistoryBuffer"]
    assert "mmengine" not in sys.modules  # the stand-in never imports the real class


def test_mmcv1_checkpoint(tmp_path):
    path = tmp_path / "sensex.pth"
    state = mmcv1_checkpoint(path)
    read = read_foreign_checkpoint(path)
    assert all(torch.equal(read.state_dict[k], v) for k, v in state.items())
    assert read.meta["CLASSES"] == ("circle", "square")
    np.testing.assert_array_equal(read.meta["lr"], [2e-5, 2e-6])
    assert read.meta["dtype"] == np.float32
    assert read.skipped == ["optimizer"] and read.stand_ins == []


def test_bare_state_dict_and_module_prefix(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({"module.a": torch.ones(2), "module.b": torch.zeros(1)}, path)
    read = read_foreign_checkpoint(path)
    assert list(read.state_dict) == ["a", "b"] and read.meta == {} and read.skipped == []


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_object_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _state_dict(), "meta": {"note": _RunsCode(marker)}}, path)
    with pytest.raises(CheckpointError) as caught:
        read_foreign_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "refusing to load" in message and "system" in message, message
    assert not marker.exists()


def test_malicious_object_in_an_openmmlab_namespace_is_inert(tmp_path, monkeypatch):
    """A global named mmengine.* is never imported: the call it asks for lands in an inert record."""
    marker = tmp_path / "pwned"
    runner = _fake_module_class(monkeypatch, "mmengine.evil.run", {"__init__": lambda self, cmd: os.system(cmd)})
    payload = type("Payload", (), {"__reduce__": lambda self: (runner, (f"touch {marker}",))})
    path = tmp_path / "evil_mm.pth"
    torch.save({"state_dict": _state_dict(), "meta": {"note": payload()}}, path)
    for name in ("mmengine", "mmengine.evil"):
        monkeypatch.delitem(sys.modules, name)
    read = read_foreign_checkpoint(path)
    note = read.meta["note"]
    assert isinstance(note, ForeignObject) and note.foreign_name == "mmengine.evil.run"
    assert note.args == (f"touch {marker}",)
    assert not marker.exists()


def test_cli_refuses_malicious_file_in_one_line(tmp_path, cli_env):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _state_dict(), "meta": {"note": _RunsCode(marker)}}, path)
    proc = subprocess.run([sys.executable, "-m", "cli", "convert", str(path), "--out", str(tmp_path / "out.pt")],
                          capture_output=True, text=True, env=cli_env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to load"), proc.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint"):
        read_foreign_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_foreign_checkpoint(tmp_path / "missing.pth")
