"""The training engine: learning, exact resume after SIGKILL, NaN handling, DDP equivalence."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codetr.config import apply_overrides, get_preset
from codetr.data.collate import Batch
from codetr.engine.checkpoint import load_checkpoint
from codetr.engine.train import Trainer, train_step
from codetr.errors import TrainingError
from codetr.models.criterion import SetCriterion, build_criterion
from codetr.models.detector import build_detector

FAST = ["data.num_workers=0", "data.batch_size=2", "model.num_queries=20", "model.num_detections=20"]


def tiny_cfg(root: Path, *overrides: str):
    return apply_overrides(get_preset("tiny"), [f"data.root={root}", *FAST, *overrides])


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_tiny_preset_overfits_a_few_images(tmp_path, synth_root):
    """4 generated images, no augmentation, evaluated on themselves: AP50 >= 0.5 after 100 steps.

    The annotation file lists each image 25 times (new ids, same file), so 100 steps of batch 4 are
    4 epochs and the run saves 4 checkpoints rather than 100.
    """
    train_dir, ann = synth_root / "train2017", synth_root / "annotations" / "instances_train2017.json"
    full = json.loads(ann.read_text())
    keep = sorted({a["image_id"] for a in full["annotations"]})[:4]
    images = [img for img in full["images"] if img["id"] in keep]
    annotations = [a for a in full["annotations"] if a["image_id"] in keep]
    four = {**full, "images": images, "annotations": annotations}
    repeated = {**full, "images": [], "annotations": []}
    for copy in range(25):
        repeated["images"] += [{**img, "id": img["id"] + 1000 * copy} for img in images]
        repeated["annotations"] += [{**a, "id": a["id"] + 100000 * copy, "image_id": a["image_id"] + 1000 * copy}
                                    for a in annotations]
    (tmp_path / "four.json").write_text(json.dumps(four))
    (tmp_path / "repeated.json").write_text(json.dumps(repeated))
    files = [f"data.train_images={train_dir}", f"data.train_ann={tmp_path / 'repeated.json'}",
             f"data.val_images={train_dir}", f"data.val_ann={tmp_path / 'four.json'}"]
    cfg = tiny_cfg(synth_root, *files, "data.augment=false", "data.batch_size=4", "data.test_size=160",
                   "data.test_max_size=256", "optim.epochs=4", "optim.lr_drop_epochs=100", "train.eval_every=0",
                   "train.keep_epoch_checkpoints=false")
    metrics = Trainer(cfg, tmp_path / "run", progress=False).run()
    assert metrics["AP50"] >= 0.5, metrics


def _codetr(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_repeats_the_same_loss_sequence(tmp_path, synth_root, cli_env):
    """co_tiny (random sub-sampling of positive queries and RoIs) with an evaluation after each epoch:
    neither the data loaders nor the evaluation may shift the random streams a resumed run replays."""
    args = ["train", "--preset", "co_tiny", "--data", str(synth_root), "--epochs", "2",
            "--set", "train.checkpoint_every=2", "--set", "train.max_iters_per_epoch=5"]
    for item in FAST:
        args += ["--set", item]
    straight = tmp_path / "straight"
    proc = _codetr(*args, "--out", str(straight), env=cli_env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    interrupted = tmp_path / "interrupted"
    proc = _codetr(*args, "--out", str(interrupted), env=cli_env)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once a mid-epoch checkpoint of epoch 1 exists
        if (interrupted / "last.pt").exists() and (interrupted / "epoch_001.pt").exists():
            try:
                if load_checkpoint(interrupted / "last.pt")["position"]["iteration"] >= 2:
                    break
            except Exception:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(interrupted / "last.pt")["position"]
    assert killed_at["epoch"] == 1 and killed_at["iteration"] >= 2

    proc = _codetr(*args, "--out", str(interrupted), "--resume", env=cli_env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    expected = [r for r in read_log(straight / "log.jsonl") if "event" not in r]
    resumed = [r for r in read_log(interrupted / "log.jsonl") if "event" not in r]
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(expected, resumed):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}  # exact
    metrics_a, metrics_b = (json.loads((run / "metrics.json").read_text()) for run in (straight, interrupted))
    assert {k: v for k, v in metrics_a.items() if k != "checkpoint"} == {k: v for k, v in metrics_b.items() if k != "checkpoint"}
    final_a = load_checkpoint(straight / "last.pt")["model"]
    final_b = load_checkpoint(interrupted / "last.pt")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_nan_loss_stops_with_iteration_and_terms_and_keeps_last_good_checkpoint(tmp_path, synth_root, monkeypatch):
    cfg = tiny_cfg(synth_root, "optim.epochs=1", "train.checkpoint_every=2", "train.max_iters_per_epoch=6")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    original = SetCriterion.forward
    calls = {"n": 0}

    def poisoned(self, outputs, targets):
        losses = original(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th iteration (index 3) produces NaN
            losses["dec.d0.loss_bbox"] = losses["dec.d0.loss_bbox"] * float("nan")
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    with pytest.raises(TrainingError) as info:
        trainer.run()
    message = str(info.value)
    assert "epoch 0 iteration 3" in message and "dec.d0.loss_bbox=nan" in message and "\n" not in message
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["position"] == {"epoch": 0, "iteration": 2, "step": 2}
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------
# DDP: 2 gloo processes, each on half the batch == one process on the whole batch.


def _ddp_batch(num_classes: int) -> Batch:
    generator = torch.Generator().manual_seed(7)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    targets = []
    for n in (1, 3, 2, 0):  # uneven box counts: the loss normaliser must be synced across ranks
        boxes = torch.cat((torch.rand(n, 2, generator=generator) * 0.5 + 0.25, torch.rand(n, 2, generator=generator) * 0.3 + 0.1), 1)
        targets.append({"boxes": boxes, "labels": torch.randint(num_classes, (n,), generator=generator)})
    return Batch(images, masks, targets)


def _step_params(cfg, batch: Batch, ddp: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=3)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train_step(wrapped, build_criterion(model, cfg.model), batch, optimizer, cfg)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, world_size: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    cfg = apply_overrides(get_preset("tiny"), FAST)
    full = _ddp_batch(3)
    half = Batch(full.images[rank * 2:(rank + 1) * 2], full.masks[rank * 2:(rank + 1) * 2], full.targets[rank * 2:(rank + 1) * 2])
    params = _step_params(cfg, half, ddp=True)
    if rank == 0:
        torch.save(params, out_file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_ddp_step_equals_one_process_on_the_combined_batch(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_file = str(tmp_path / "ddp.pt")
    mp.start_processes(_ddp_worker, args=(2, port, out_file), nprocs=2, join=True, start_method="spawn")
    ddp_params = torch.load(out_file)
    cfg = apply_overrides(get_preset("tiny"), FAST)
    single = _step_params(cfg, _ddp_batch(3), ddp=False)
    torch.manual_seed(0)
    initial = build_detector(cfg.model, num_classes=3).state_dict()
    moved = 0
    for name, value in single.items():
        assert torch.allclose(ddp_params[name], value, atol=1e-6, rtol=1e-4), name  # float32 reduction order
        moved += int(not torch.allclose(initial[name], value, atol=1e-4))
    assert moved > 50  # the step really changed the weights, so the comparison is not vacuous


def test_ema_follows_the_closed_form_recurrence_and_is_what_gets_deployed(tmp_path, synth_root, monkeypatch):
    import codetr.engine.train as train_module
    from codetr.engine.inference import load_detector

    decay = 0.5
    cfg = tiny_cfg(synth_root, "optim.epochs=1", "train.max_iters_per_epoch=3", "train.ema=true",
                   f"train.ema_decay={decay}", "train.eval_every=0")
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    name = "transformer.decoder.layers.0.ffn.0.weight"
    snapshots = []
    original = train_module.train_step

    def recording_step(model, *args, **kwargs):
        record = original(model, *args, **kwargs)
        snapshots.append(dict(model.named_parameters())[name].detach().clone())
        return record

    monkeypatch.setattr(train_module, "train_step", recording_step)
    trainer.run()
    expected = snapshots[0]  # the first update copies the weights
    for weights in snapshots[1:]:
        expected = decay * expected + (1 - decay) * weights
    ema_weights = dict(trainer.ema.module.named_parameters())[name]
    assert torch.allclose(ema_weights, expected, atol=1e-6)  # float32 arithmetic
    assert not torch.allclose(ema_weights, snapshots[-1], atol=1e-6)
    deployed = load_detector(tmp_path / "run" / "last.pt")
    assert torch.equal(dict(deployed.model.named_parameters())[name], ema_weights.detach())
