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
