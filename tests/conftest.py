"""Shared fixtures: a small generated dataset, made once per test session."""
import os
from pathlib import Path

import pytest

from codetr.data.synth import generate_synthetic_coco

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A COCO 2017-layout generated dataset: 16 train and 8 val images."""
    return generate_synthetic_coco(tmp_path_factory.mktemp("synth"), num_train=16, num_val=8, seed=3)


@pytest.fixture
def cli_env(tmp_path) -> dict:
    """Environment for `codetr` subprocesses: a private data cache, unbuffered output, 1 thread each."""
    env = dict(os.environ)
    env.update(CODETR_DATA=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def train_fixture_checkpoint(preset: str, data_root: Path, out_dir: Path, iterations: int = 6) -> Path:
    """Train `preset` for a few iterations on `data_root` (small images) and return its last.pt.

    Used by the analysis tests and notebooks: the weights are barely trained, but every module the
    analyses touch (encoder, one-to-one head, auxiliary heads) is a real trained checkpoint.
    """
    from codetr.config import apply_overrides, get_preset
    from codetr.engine.train import train

    cfg = apply_overrides(get_preset(preset), [
        f"data.root={data_root}", "optim.epochs=1", f"train.max_iters_per_epoch={iterations}",
        "data.batch_size=2", "data.train_scales=[160]", "data.max_size=200", "data.augment=false",
        "data.test_size=160", "data.test_max_size=200", "train.seed=0",
    ])
    train(cfg, out_dir, progress=False)
    return out_dir / "last.pt"


@pytest.fixture(scope="session")
def co_tiny_pp_ckpt(synth_root, tmp_path_factory) -> Path:
    """A `co_tiny_pp` (Deformable-DETR++, ATSS + Faster-RCNN) checkpoint trained for a few iterations."""
    return train_fixture_checkpoint("co_tiny_pp", synth_root, tmp_path_factory.mktemp("co_tiny_pp_run"))


@pytest.fixture(scope="session")
def tiny_ckpt(synth_root, tmp_path_factory) -> Path:
    """A `tiny` (plain Deformable-DETR, no auxiliary heads) checkpoint trained for a few iterations on `synth_root`."""
    return train_fixture_checkpoint("tiny", synth_root, tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from two, and on a busy 2-core machine two threads wait on
    each other (measured: a step of 2 x 1 images 0.3 s with one thread, 3-11 s with two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port nobody listens on now (for a gloo process group's MASTER_PORT)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
