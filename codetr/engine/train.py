"""Training: the loop, checkpoints every epoch (and optionally every N iterations), exact resume.

An iteration is one optimizer step: with train.accumulate_steps = A it runs A micro-batches of data.batch_size
(gradient accumulation), and max_iters_per_epoch, checkpoint_every and log.jsonl's iter / step count those
steps. An epoch is still one pass over the data (A times fewer iterations) and the lr drops are per epoch.

Layout of an output directory:
    config.json        the resolved config
    log.jsonl          one record per iteration (every raw loss term, the weighted total, lr, time),
                       plus {"event": "eval", ...} records and one {"event": "start", ...} per (re)start
                       (the effective batch)
    tb/                the same scalars as TensorBoard event files (train.tensorboard)
    last.pt            the latest checkpoint; epoch_XXX.pt after each epoch
    metrics.json       the latest evaluation
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Sequence

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from codetr.config import Config
from codetr.data.collate import Batch
from codetr.data.loaders import build_dataset, build_eval_loader, build_train_loader
from codetr.engine.amp import autocast_context, needs_grad_scaler
from codetr.engine.memory import keep_freed_memory_for_reuse
from codetr.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from codetr.engine.distributed import DistInfo, any_rank_true, barrier, broadcast_from_main, gather_objects, init_distributed
from codetr.engine.folder_lock import RunFolderLock
from codetr.engine.evaluate import evaluate, write_eval_outputs
from codetr.engine.optim import build_optimizer, build_scheduler
from codetr.engine.progress import TrainProgress
from codetr.engine.tensorboard_log import TensorBoardLog
from codetr.errors import CheckpointError, ConfigError, DataError, DivergenceError, TrainingError
from codetr.io import atomic_write_json, atomic_write_text
from codetr.models.criterion import SetCriterion, build_criterion
from codetr.models.total_loss import weighted_total
from codetr.models.checkpointing import use_activation_checkpointing
from codetr.models.detector import build_detector
from codetr.models.loss_terms import head_stat


@dataclass
class Position:
    """Where training stands: the next epoch and iteration to run, and the optimizer steps so far."""

    epoch: int = 0
    iteration: int = 0
    step: int = 0


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    batch: Batch | Sequence[Batch],
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    scaler: torch.amp.GradScaler | None = None,
    where: str = "",
) -> dict[str, float]:
    """One optimizer step: forward + backward of `batch`, or of each micro-batch of a gradient-accumulation step
    (a sequence of batches), then one update. Returns the raw loss terms and `loss` (weighted total): for
    micro-batches their means (the big batch's values, see below) and the heads' assignment counts summed.

    Micro-batches make one big batch: their box-normalised losses all divide by the mean box count of the
    micro-batches (SetCriterion.shared_box_count) and each gradient by their number, as DDP averages over ranks;
    under DDP all but the last skip the all-reduce (no_sync). A non-finite total on any rank raises TrainingError
    on every rank before any weight changes.
    """
    batches = [batch] if isinstance(batch, Batch) else list(batch)
    count = len(batches)
    # a single batch divides by its own boxes, exactly as before accumulation existed
    box_count = sum(len(t["labels"]) for b in batches for t in b.targets) / count if count > 1 else None
    optimizer.zero_grad(set_to_none=True)
    losses, counts = [], []
    with criterion.shared_box_count(box_count):
        for index, micro in enumerate(batches):
            at = f"{where} (micro-batch {index + 1} of {count})" if count > 1 else where
            with gradient_sync(model, index == count - 1):
                micro_losses, micro_counts = forward_backward(model, criterion, micro, cfg, scaler, at, count)
            losses.append(micro_losses)
            counts.append(micro_counts)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if cfg.optim.clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    check_parameters_finite(model, where)
    return {**mean_values(losses), **{key: sum(c[key] for c in counts) for key in counts[0]}}


def forward_backward(
    model: nn.Module,
    criterion: SetCriterion,
    batch: Batch,
    cfg: Config,
    scaler: torch.amp.GradScaler | None,
    where: str,
    share: int = 1,
) -> tuple[dict[str, float], dict[str, float]]:
    """Forward, losses and backward of one (micro-)batch, its gradient divided by `share` (the micro-batches of
    the step). Returns (raw terms and `loss`, the heads' assignment counts)."""
    device = batch.images.device
    with autocast_context(device, cfg.train.amp):
        outputs = model(batch.images, batch.masks, batch.targets)
    try:
        raw = criterion(outputs, batch.targets)
    except DivergenceError as error:  # the matcher found non-finite predictions: say where, one line
        raise DivergenceError(f"{error} {where}; lower optim.lr").with_traceback(None) from None
    total, _ = weighted_total(raw, criterion.weights)
    if any_rank_true(not bool(torch.isfinite(total)), device):
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in raw.items())
        raise TrainingError(f"non-finite loss {where}: loss={total.item():.4g}; {terms}")
    scaled = total / share if share > 1 else total
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    record = {name: value.item() for name, value in raw.items()}
    record["loss"] = total.item()
    counts = {}
    for branch in outputs.aux or []:  # Co-DETR: how many positives each head assigned (before the cap)
        assigned = branch.assignment_counts()
        counts[head_stat(branch.name, "positives")] = float(sum(p for p, _ in assigned))
        counts[head_stat(branch.name, "gts")] = float(sum(g for _, g in assigned))
    return record, counts


def gradient_sync(model: nn.Module, sync: bool) -> ContextManager[Any]:
    """DDP's no_sync() unless `sync`: accumulated micro-batches all-reduce their gradients once, on the last."""
    if sync or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def mean_values(records: list[dict[str, float]]) -> dict[str, float]:
    """Each key's mean over the records (one record: its own values, unchanged)."""
    if len(records) == 1:
        return records[0]
    return {key: sum(r[key] for r in records) / len(records) for key in records[0]}


def remove_stale_temp_files(out_dir: Path) -> None:
    """Delete the temporary files of atomic writes that a killed process left behind (.NAME.XXXX.tmp: a
    checkpoint's can be hundreds of MB). Called when a run starts, before it writes anything."""
    for stale in out_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def check_parameters_finite(model: nn.Module, where: str = "") -> None:
    """Raise DivergenceError naming the non-finite parameters, if the step made any (one fused norm per step;
    a finite loss does not guarantee finite weights after a huge learning rate)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if torch.isfinite(torch.nn.utils.get_total_norm(parameters, foreach=True)):
        return
    names = [name for name, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if not names:  # the norm overflowed on large but finite weights
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise DivergenceError(f"the weights diverged {where}: {len(names)} parameters hold NaN/inf after the optimizer "
                          f"step ({shown}); lower optim.lr (the checkpoints on disk are from before)")


class Trainer:
    """Holds everything one training run needs; `run()` trains to the configured number of epochs."""

    tb: TensorBoardLog | None = None  # rank 0's TensorBoard writer while `run()` runs (train.tensorboard)

    def __init__(self, cfg: Config, out_dir: Path, resume: bool = False, device: str = "", progress: bool = True):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.dist: DistInfo = init_distributed(device)
        self.device = self.dist.device
        self.progress = progress and self.dist.is_main
        # one process trains into a folder: a second `codetr train --out` on it stops here (rank 0 holds it)
        self.folder_lock = RunFolderLock(self.out_dir).acquire() if self.dist.is_main else None
        if self.folder_lock is not None:
            weakref.finalize(self, self.folder_lock.release)
        last = self.out_dir / "last.pt"
        if last.exists() and not resume:
            raise CheckpointError(f"{last} exists: pass --resume to continue that run, or choose another --out")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

        self.train_set = build_dataset(cfg.data, "train")
        if 0 < cfg.model.num_classes < self.train_set.num_classes:  # labels past the classifier: an IndexError later
            raise ConfigError(f"model.num_classes={cfg.model.num_classes}: {self.train_set.ann_file} has "
                              f"{self.train_set.num_classes} categories; expected >= {self.train_set.num_classes} "
                              "(or 0: the training set's count)")
        if self.train_set.num_boxes() == 0:  # it would "train" on background only and report AP 0
            raise DataError(f"{self.train_set.ann_file}: no usable annotations (the 'annotations' list is empty or "
                            "every box is crowd or dropped): nothing to train on")
        self.val_set = build_dataset(cfg.data, "val")
        if self.val_set.cat_ids != self.train_set.cat_ids:
            raise DataError(
                f"{self.val_set.ann_file}: categories {self.val_set.cat_ids} differ from the training set's "
                f"{self.train_set.cat_ids}"
            )
        if self.device.type == "cpu" and cfg.train.reuse_freed_memory:
            keep_freed_memory_for_reuse()
        self.model = build_detector(cfg.model, self.train_set.num_classes).to(self.device)
        use_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        self.criterion = build_criterion(self.model, cfg.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(self.device, cfg.train.amp) else None
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
            if cfg.train.ema
            else None
        )
        self.loader, self.seeded_set, self.sampler = build_train_loader(
            self.train_set, cfg.data, cfg.train.seed, self.dist.rank, self.dist.world_size
        )
        self.position = Position()
        if resume and last.exists():
            self._restore(last)
        self.ddp_model: nn.Module = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.distributed
            else self.model
        )
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # a fresh start (step 0) drops a killed run's whole log; a resume drops what follows its checkpoint
            self._truncate_log(self.position.step)
            remove_stale_temp_files(self.out_dir)
            atomic_write_json(self.out_dir / "config.json", cfg.to_dict())

    # -- checkpoints -----------------------------------------------------------------------------

    def _state(self, rng_per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "position": vars(self.position).copy(),
            "config": self.cfg.to_dict(),
            "num_classes": self.model.num_classes,
            "cat_ids": self.train_set.cat_ids,
            "class_names": self.train_set.class_names,
            "rng": rng_per_rank,  # one entry per rank: their random streams differ (e.g. Co-DETR sampling)
        }

    def save(self, epoch_file: bool) -> None:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        rng_per_rank = gather_objects(rng)
        if self.dist.is_main:
            state = self._state(rng_per_rank)
            save_checkpoint(self.out_dir / "last.pt", state)
            if epoch_file and self.cfg.train.keep_epoch_checkpoints:
                save_checkpoint(self.out_dir / f"epoch_{self.position.epoch:03d}.pt", state)
            if self.tb is not None:  # the event files reach the checkpoint, as log.jsonl does
                self.tb.flush()
        barrier()

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state.get("weights_only") or "optimizer" not in state:  # `codetr export --weights-only`: nothing to resume
            raise CheckpointError(f"cannot resume from {path}: it holds model weights only (a weights-only export or a "
                                  "converted checkpoint: no optimizer, scheduler or RNG state); resume from the run's "
                                  "full checkpoint, or start a new run")
        load_model_state(self.model, state["model"], source=str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as error:  # parameter groups of another size: an older codetr's model
            raise CheckpointError(f"cannot resume from {path}: its optimizer state does not fit this model ({error}); "
                                  "it was written by an older codetr: start a new run") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.position = Position(**state["position"])
        saved = state["rng"]
        rng = saved[self.dist.rank] if len(saved) == self.dist.world_size else saved[0]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _truncate_log(self, step: int) -> None:
        """Drop log records written after the checkpoint we resume from (they will be re-run)."""
        log = self.out_dir / "log.jsonl"
        if not log.exists():
            return
        kept = []
        for line in log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the interrupt (or damaged: dropped, it is not ours to keep)
            if not isinstance(record, dict):
                continue
            if record.get("event") == "start":  # a (re)start's record: kept if training went on from it
                keep = record["from_step"] < step
            else:
                keep = record.get("step", 0) <= step and not (record.get("event") == "eval" and record["epoch"] > self.position.epoch)
            if keep:
                kept.append(line)
        atomic_write_text(log, "".join(line + "\n" for line in kept))

    # -- the loop --------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def effective_batch(self) -> int:
        """Images per optimizer step over all processes: batch_size x world size x accumulate_steps."""
        return self.cfg.data.batch_size * self.dist.world_size * self.cfg.train.accumulate_steps

    def iterations_per_epoch(self) -> int:
        """Optimizer steps per epoch: this rank's batches grouped by accumulate_steps (the last group may be
        short), at most train.max_iters_per_epoch."""
        per_rank = math.ceil(len(self.seeded_set) / self.dist.world_size)
        full = math.ceil(math.ceil(per_rank / self.cfg.data.batch_size) / self.cfg.train.accumulate_steps)
        limit = self.cfg.train.max_iters_per_epoch
        return min(full, limit) if limit > 0 else full

    def train_one_epoch(self, progress: TrainProgress) -> None:
        epoch = self.position.epoch
        total_iters = self.iterations_per_epoch()
        self.seeded_set.epoch = epoch
        accumulate = self.cfg.train.accumulate_steps
        self.sampler.set_epoch(epoch, skip=self.position.iteration * accumulate * self.cfg.data.batch_size)
        self.ddp_model.train()
        progress.start_epoch(epoch, total_iters, done=self.position.iteration)
        tick = time.perf_counter()
        micro_batches = iter(self.loader)
        while self.position.iteration < total_iters:
            group = [batch.to(self.device) for batch in itertools.islice(micro_batches, accumulate)]
            if not group:
                break
            where = f"at epoch {epoch} iteration {self.position.iteration}"
            record = train_step(self.ddp_model, self.criterion, group, self.optimizer, self.cfg, self.scaler, where)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.position.iteration += 1
            self.position.step += 1
            elapsed = time.perf_counter() - tick
            tick = time.perf_counter()
            record = {"epoch": epoch, "iter": self.position.iteration - 1, "step": self.position.step,
                      "lr": self.optimizer.param_groups[0]["lr"], "time": elapsed, **record}
            self._log(record)
            if self.tb is not None:
                self.tb.iteration(record)
            progress.advance(record)
            every = self.cfg.train.checkpoint_every
            if every > 0 and self.position.iteration % every == 0 and self.position.iteration < total_iters:
                self.save(epoch_file=False)
        progress.end_epoch()

    def evaluate(self) -> dict[str, float]:
        model = self.ema.module if self.ema is not None else self.model
        loader = build_eval_loader(self.val_set, self.cfg.data, self.dist.rank, self.dist.world_size)
        metrics, detections = evaluate(
            model, loader, self.val_set.coco, self.val_set.cat_ids, self.device, amp=self.cfg.train.amp,
            progress=self.progress,
        )
        if self.dist.is_main:
            extra = {"epoch": self.position.epoch, "checkpoint": str(self.out_dir / "last.pt")}
            write_eval_outputs(self.out_dir, metrics, detections, extra=extra)
            self._log({"event": "eval", "epoch": self.position.epoch, "step": self.position.step, **metrics})
            if self.tb is not None:
                self.tb.evaluation(metrics, self.position.step)
        return metrics

    def _eval_due(self) -> bool:
        every, epoch = self.cfg.train.eval_every, self.position.epoch
        return epoch > 0 and ((every > 0 and epoch % every == 0) or epoch == self.cfg.optim.epochs)

    def _evaluated_epoch(self) -> int:
        metrics_file = self.out_dir / "metrics.json"
        if not metrics_file.exists():
            return -1
        return int(json.loads(metrics_file.read_text()).get("epoch", -1))

    def _announce_start(self) -> None:
        """A log.jsonl record per (re)start stating the effective batch (on stderr too, with the progress bar)."""
        batch, world, accumulate = self.cfg.data.batch_size, self.dist.world_size, self.cfg.train.accumulate_steps
        self._log({"event": "start", "epoch": self.position.epoch, "iter": self.position.iteration,
                   "from_step": self.position.step, "batch_size": batch, "world_size": world,
                   "accumulate_steps": accumulate, "effective_batch": self.effective_batch()})
        if self.progress and (world > 1 or accumulate > 1):  # otherwise it is just data.batch_size
            print(f"effective batch {self.effective_batch()} = {batch} per process x {world} process(es) x "
                  f"{accumulate} accumulated micro-batch(es) per optimizer step", file=sys.stderr)

    def run(self) -> dict[str, float]:
        """Train to the configured number of epochs (TensorBoard event files in RUN/tb/ unless train.tensorboard
        is false); returns the last evaluation's metrics."""
        if self.dist.is_main and self.cfg.train.tensorboard:
            self.tb = TensorBoardLog(self.out_dir / "tb", resumed_step=self.position.step)
        try:
            self._announce_start()
            return self._train()
        finally:
            if self.tb is not None:
                self.tb.close()
                self.tb = None

    def _train(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        epochs = self.cfg.optim.epochs
        # An interrupt between an epoch's checkpoint and its evaluation: evaluate now.
        missed = self.position.iteration == 0 and self._eval_due() and self._evaluated_epoch() != self.position.epoch
        if broadcast_from_main(missed):  # rank 0 decides: every rank must join the evaluation
            metrics = self.evaluate()
        with TrainProgress(enabled=self.progress) as progress:
            while self.position.epoch < epochs:
                self.train_one_epoch(progress)
                self.scheduler.step()
                self.position.epoch += 1
                self.position.iteration = 0
                self.save(epoch_file=True)
                if self._eval_due():
                    metrics = self.evaluate()
        return metrics


def train(cfg: Config, out_dir: Path, resume: bool = False, device: str = "", progress: bool = True) -> dict[str, float]:
    """Train (or resume) a run into `out_dir`; returns the last evaluation's metrics."""
    trainer = Trainer(cfg, out_dir, resume=resume, device=device, progress=progress)
    try:
        return trainer.run()
    finally:
        if trainer.folder_lock is not None:
            trainer.folder_lock.release()
