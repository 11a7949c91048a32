"""TensorBoard event files (RUN/tb/): a 2-point grid's runs hold every scalar of their log.jsonl, and a resumed
run's events supersede what the interrupted run wrote after its checkpoint."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

import codetr.engine.train as train_module
from codetr.config import apply_overrides, get_preset
from codetr.engine.train import Trainer

POSITION = ("epoch", "iter", "step", "event")
SMALL = ["data.train_scales=[128]", "data.max_size=160", "data.test_size=128", "data.test_max_size=160",
         "data.batch_size=2", "data.num_workers=0"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tests run with one intra-op thread (see conftest.one_thread)."""


def expected_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl's values as TensorBoard stores them: {tag: [(step, value rounded to float32), ...]}."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        section = {None: "train", "eval": "eval"}.get(record.get("event"))
        if section is None:  # a start record: no curve
            continue
        for key, value in record.items():
            if key not in POSITION:
                scalars.setdefault(f"{section}/{key}", []).append((record["step"], float(np.float32(value))))
    return scalars


def stored_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()  # 0: keep every event
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_a_two_point_grid_shows_every_loss_term_lr_and_metric(synth_root, tmp_path, monkeypatch):
    from experiments.ablate import Schedule, grid_from_flags, run_grid
    from experiments.launchers import LaunchOptions

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = grid_from_flags([("lambda1", "0.5,1")], overrides=SMALL)
    grid = tmp_path / "grid"
    run_grid(spec, grid, Schedule(epochs=1, max_iters=2), synth_root, LaunchOptions(launcher="local", poll_s=0.2),
             show_progress=False, log=lambda text: None)

    runs = EventMultiplexer().AddRunsFromDirectory(str(grid)).Runs()  # what `tensorboard --logdir GRID` lists
    assert set(runs) == {"lambda1=0.5__seed0/tb", "lambda1=1__seed0/tb"}
    for name in ("lambda1=0.5__seed0", "lambda1=1__seed0"):
        expected, stored = expected_scalars(grid / name), stored_scalars(grid / name)
        # co_tiny: the one-to-one terms, ATSS's own and its positive queries', the weighted total, lr, AP...
        assert {"train/dec.d2.loss_cls", "train/aux.atss.loss_centerness", "train/posq.atss.d0.loss_giou",
                "train/stats.atss.positives", "train/loss", "train/lr", "eval/AP", "eval/AP50"} <= set(expected)
        assert set(stored) == set(expected)
        for tag, values in expected.items():
            assert stored[tag] == values, tag  # exact: log.jsonl's value rounded to float32 (TensorBoard's precision)
        assert [step for step, _ in stored["train/loss"]] == [1, 2] and [s for s, _ in stored["eval/AP"]] == [2]


def run_cfg(root: Path):
    return apply_overrides(get_preset("tiny"), [
        f"data.root={root}", *SMALL, "data.augment=false", "model.num_queries=20", "model.num_detections=20",
        "optim.epochs=1", "train.max_iters_per_epoch=4", "train.checkpoint_every=2"])


def test_a_resumed_run_supersedes_the_events_after_its_checkpoint(synth_root, tmp_path, monkeypatch):
    """Interrupted after step 3 was logged (and written to tb/), with the checkpoint at step 2: the resumed run's
    steps 3 and 4 replace it, so every curve has each step once, with log.jsonl's values."""
    original, calls = train_module.train_step, {"n": 0}

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_cfg(synth_root), run, progress=False).run()
    assert [step for step, _ in stored_scalars(run)["train/loss"]] == [1, 2, 3]
    monkeypatch.setattr(train_module, "train_step", original)
    Trainer(run_cfg(synth_root), run, resume=True, progress=False).run()

    expected, stored = expected_scalars(run), stored_scalars(run)
    assert [step for step, _ in stored["train/loss"]] == [1, 2, 3, 4]
    assert set(stored) == set(expected) and all(stored[tag] == values for tag, values in expected.items())
