"""Gradient accumulation (train.accumulate_steps): N micro-batches of B make one optimizer step of N x B, a run
with accumulation resumes exactly, and the config checks and hash."""
import json
import os
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import codetr.engine.train as train_module
from codetr.config import apply_overrides, get_preset
from codetr.data.collate import Batch
from codetr.engine.checkpoint import load_checkpoint
from codetr.engine.train import Trainer, train_step
from codetr.errors import ConfigError, TrainingError
from codetr.models.criterion import SetCriterion, build_criterion
from codetr.models.detector import build_detector
from tests.conftest import free_port

FAST = ["data.num_workers=0", "model.num_queries=20", "model.num_detections=20", "model.transformer.dropout=0"]
# Updates agree to float32 round-off (summation order): measured 7e-7 to 6e-6 of the largest update (1 or 2 threads).
TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """These tests run with one intra-op thread (see conftest.one_thread)."""


def synthetic_batch(counts: tuple[int, ...], num_classes: int = 3, seed: int = 7) -> Batch:
    """Same-size 64 x 64 images (no padding differs between a micro-batch and the whole batch), `counts` boxes."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(len(counts), 3, 64, 64, generator=generator)
    masks = torch.zeros(len(counts), 64, 64, dtype=torch.bool)
    targets = []
    for n in counts:
        centres = torch.rand(n, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.1
        targets.append({"boxes": torch.cat((centres, sizes), 1), "labels": torch.randint(num_classes, (n,), generator=generator)})
    return Batch(images, masks, targets)


def split(batch: Batch, parts: int) -> list[Batch]:
    size = len(batch.targets) // parts
    return [Batch(batch.images[i:i + size], batch.masks[i:i + size], batch.targets[i:i + size])
            for i in range(0, len(batch.targets), size)]


def one_step(cfg, batch: Batch | list[Batch], ddp: bool = False,
             scaler: torch.amp.GradScaler | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(parameter updates, the step's record) of one SGD step from the seed-0 initial weights."""
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    record = train_step(wrapped, build_criterion(model, cfg.model), batch, optimizer, cfg, scaler)
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}, record


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over all tensors, relative to b's largest entry."""
    scale = max(v.abs().max().item() for v in b.values())
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


def tiny_cfg(*overrides: str):
    return apply_overrides(get_preset("tiny"), [*FAST, *overrides])


def test_the_tiny_model_has_no_batch_dependent_layers():
    """What makes micro-batches equal to their union: frozen BatchNorm (FrozenBatchNorm2d), no dropout."""
    model = build_detector(tiny_cfg().model, num_classes=3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def test_accumulated_micro_batches_equal_one_step_on_the_combined_batch(monkeypatch):
    cfg = tiny_cfg()
    batch = synthetic_batch((1, 3, 2, 0))  # 2 x 2: 4 boxes in the first micro-batch, 2 in the second
    whole_update, whole = one_step(cfg, batch)
    accumulated_update, accumulated = one_step(cfg, split(batch, 2))
    assert largest_difference(accumulated_update, whole_update) < TOLERANCE  # measured 7e-7
    ones_update, _ = one_step(cfg, split(batch, 4))  # 4 x 1, the last without a box
    assert largest_difference(ones_update, whole_update) < TOLERANCE  # measured 7e-7 (6e-6 with two threads)
    assert sum(v.abs().max().item() > 1e-6 for v in whole_update.values()) > 50  # the step moved the weights
    # the logged terms are the big batch's (mean of the micro-batches' under the shared normaliser)
    assert set(accumulated) == set(whole)
    for name, value in whole.items():
        assert accumulated[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name

    # Each micro-batch normalised by its own boxes is a different step: the check above can fail.
    monkeypatch.setattr(SetCriterion, "shared_box_count", lambda self, count: nullcontext())
    own_update, _ = one_step(cfg, split(batch, 2))
    assert largest_difference(own_update, whole_update) > 100 * TOLERANCE  # measured 0.32


def test_a_grad_scaler_unscales_the_accumulated_gradient_once():
    """fp16 training's GradScaler (here on the CPU, in float32: a power-of-2 scale changes no bit of the update)."""
    cfg = tiny_cfg()
    micro_batches = split(synthetic_batch((1, 3, 2, 0)), 2)
    plain, _ = one_step(cfg, micro_batches)
    scaled, _ = one_step(cfg, micro_batches, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert largest_difference(scaled, plain) < TOLERANCE  # measured 0 (bit-identical)


def test_a_nan_in_the_last_micro_batch_stops_before_the_weights_change(monkeypatch):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=3)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original, calls = SetCriterion.forward, {"n": 0}

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 2:
            losses["dec.d1.loss_giou"] = losses["dec.d1.loss_giou"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingError) as info:
        train_step(model, build_criterion(model, cfg.model), split(synthetic_batch((1, 3, 2, 0)), 2), optimizer, cfg,
                   where="at epoch 0 iteration 5")
    assert "at epoch 0 iteration 5 (micro-batch 2 of 2)" in str(info.value) and "dec.d1.loss_giou=nan" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_accumulate_steps_is_validated_and_hashed_only_when_used():
    with pytest.raises(ConfigError) as info:
        tiny_cfg("train.accumulate_steps=0")
    assert str(info.value) == "train.accumulate_steps=0: expected >= 1 (micro-batches per optimizer step)"
    base = get_preset("tiny")
    assert apply_overrides(base, ["train.accumulate_steps=1"]).hash() == base.hash()  # runs before it keep theirs
    assert apply_overrides(base, ["train.accumulate_steps=2"]).hash() != base.hash()
    assert apply_overrides(base, ["train.tensorboard=false"]).hash() == base.hash()


def run_cfg(root: Path, *overrides: str):
    return apply_overrides(get_preset("tiny"), [
        f"data.root={root}", *FAST, "data.batch_size=1", "train.accumulate_steps=2", "data.augment=false",
        "data.test_size=96", "data.test_max_size=128", "optim.epochs=1", "train.max_iters_per_epoch=4",
        "train.checkpoint_every=2", "train.eval_every=0", "train.tensorboard=false", *overrides])


def read_steps(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records if "event" not in r]


def test_accumulated_run_resumes_bit_for_bit(synth_root, tmp_path, monkeypatch):
    """batch 1 x 2 micro-batches, 4 optimizer steps, a checkpoint every 2: interrupted after the 3rd step was
    logged (past the mid-epoch checkpoint), then resumed: the same records and weights."""
    straight = Trainer(run_cfg(synth_root), tmp_path / "straight", progress=False)
    assert straight.iterations_per_epoch() == 4 and straight.effective_batch() == 2
    straight.run()
    assert not (tmp_path / "straight" / "tb").exists()  # train.tensorboard=false

    calls = {"n": 0}
    original = train_module.train_step

    def interrupted_step(model, criterion, batches, *args, **kwargs):
        assert len(batches) == 2  # two micro-batches per optimizer step
        calls["n"] += 1
        if calls["n"] == 4:  # iteration 3
            raise KeyboardInterrupt
        return original(model, criterion, batches, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_cfg(synth_root), tmp_path / "resumed", progress=False).run()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["position"] == {"epoch": 0, "iteration": 2, "step": 2}
    monkeypatch.setattr(train_module, "train_step", original)
    Trainer(run_cfg(synth_root), tmp_path / "resumed", resume=True, progress=False).run()

    expected, resumed = read_steps(tmp_path / "straight"), read_steps(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and [r["iter"] for r in resumed] == [0, 1, 2, 3]
    assert resumed == expected  # exact
    final_a = load_checkpoint(tmp_path / "straight" / "last.pt")["model"]
    final_b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    starts = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
              if '"start"' in line]
    assert [s["from_step"] for s in starts] == [0, 2] and {s["effective_batch"] for s in starts} == {2}


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # the stub never steps
def test_an_epoch_is_one_pass_over_the_data_in_the_same_order(synth_root, tmp_path, monkeypatch):
    """16 training images at batch 2 are 8 micro-batches: 8 optimizer steps without accumulation, 4 with 2 and
    3 with 3 (the last of 2), over the same images in the same order (the training step is a stub here)."""
    seen: dict[int, list[list[list[int]]]] = {}

    def record_images(model, criterion, batches, *args, **kwargs):
        seen[accumulate].append([[int(t["image_id"]) for t in batch.targets] for batch in batches])
        return {"loss": 0.0}

    monkeypatch.setattr(train_module, "train_step", record_images)
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {})
    for accumulate, iterations in ((1, 8), (2, 4), (3, 3)):
        cfg = run_cfg(synth_root, "data.batch_size=2", f"train.accumulate_steps={accumulate}", "train.max_iters_per_epoch=0")
        trainer = Trainer(cfg, tmp_path / f"a{accumulate}", progress=False)
        assert trainer.iterations_per_epoch() == iterations and trainer.effective_batch() == 2 * accumulate
        seen[accumulate] = []
        trainer.run()
        assert [len(step) for step in seen[accumulate]] == {1: [1] * 8, 2: [2] * 4, 3: [3, 3, 2]}[accumulate]
    order = [[image for batch in step for image in batch] for step in seen[1]]
    for accumulate in (2, 3):
        assert [image for step in seen[accumulate] for batch in step for image in batch] == sum(order, [])
    assert sorted(sum(order, [])) == sorted(set(sum(order, []))) and len(sum(order, [])) == 16  # each image once


# ---------------------------------------------------------------------------------------------
# DDP: 2 gloo processes x 2 accumulated micro-batches of 1 image == one process on the 4 images.


def _ddp_worker(rank: int, world_size: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = tiny_cfg()
    mine = split(synthetic_batch((1, 3, 2, 0)), 4)[rank::2]  # rank 0: images 0 and 2, rank 1: images 1 and 3
    update, _ = one_step(cfg, mine, ddp=True)
    if rank == 0:
        torch.save(update, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_accumulation_under_two_process_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    port = free_port()
    out_file = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(2, port, out_file), nprocs=2, join=True, start_method="spawn")
    whole_update, _ = one_step(tiny_cfg(), synthetic_batch((1, 3, 2, 0)))
    assert largest_difference(torch.load(out_file), whole_update) < TOLERANCE
