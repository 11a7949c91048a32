"""Training cost per configuration, in the shape of the paper's cost table: seconds per training
iteration and peak memory, one row per config (config, method, K, heads, s/iter, x baseline, peak MB).

A training iteration is `codetr.engine.train.train_step` on a fixed synthetic batch: forward, all
losses, backward, gradient clipping and the optimizer step, with the config's mixed precision
(train.amp, CUDA only). Data loading and EMA are not included. s/iter is the median over `iters`
timed iterations after `warmup` untimed ones; "x baseline" divides by the first row of the one-to-one baseline
(method deformable_detr: no auxiliary heads, no H-DETR / Group-DETR queries), or by the first row if there is none.

Peak memory: on CUDA torch.cuda.max_memory_allocated (tensors only, reset after warm-up, so it is the
timed iterations' peak); on CPU the process's peak resident set size (ru_maxrss, which includes the
Python interpreter and torch themselves). With isolate=True (the default) every config runs in its own
subprocess (`python -m analysis.profile --worker`), so its peak is its own and no config warms another's
caches; in-process, CPU peaks only grow from one config to the next.
"""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from codetr.config import Config, config_from_dict, resolved_method
from codetr.engine.memory import keep_freed_memory_for_reuse, peak_memory_mb
from codetr.errors import ConfigError
from codetr.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


# -- measurement helpers (also used by bench/bench_detector.py; peak memory: codetr.engine.memory) ----


def synthetic_batch(batch: int, height: int, width: int, num_classes: int, device: torch.device, seed: int = 0):
    """Random images [B, 3, H, W], no padding (masks [B, H, W] all False) and 5 random boxes per image
    (targets: "boxes" [5, 4] cxcywh normalised, "labels" [5] int64)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    targets = []
    for _ in range(batch):
        centres = torch.rand(5, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(5, 2, generator=generator) * 0.3 + 0.05
        targets.append({"boxes": torch.cat((centres, sizes), 1).to(device),
                        "labels": torch.randint(num_classes, (5,), generator=generator).to(device)})
    return images.to(device), masks.to(device), targets


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak (the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"


def time_iterations(step: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """Run `step` warmup times untimed, reset the CUDA peak, then time `iters` runs (seconds each)."""
    for _ in range(warmup):
        step()
    sync(device)
    reset_peak_memory(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


# -- one configuration --------------------------------------------------------------------------------


def measure_training_step(cfg: Config, size_hw: tuple[int, int], batch: int, iters: int, warmup: int,
                          device: torch.device, num_classes: int = 80, seed: int = 0) -> dict:
    """Time `train_step` of `cfg` on a synthetic batch of `batch` images of `size_hw` (h, w).

    Returns {"times": [s] per timed iteration, "seconds": their median, "peak_mb", "params": count,
    "peak_mb_before_model": the peak before the model was built (on CPU: what the process itself takes)}.
    """
    from codetr.data.collate import Batch
    from codetr.engine.amp import needs_grad_scaler
    from codetr.engine.optim import build_optimizer
    from codetr.engine.train import train_step
    from codetr.models.criterion import build_criterion
    from codetr.models.checkpointing import use_activation_checkpointing
    from codetr.models.detector import build_detector

    if device.type == "cpu" and cfg.train.reuse_freed_memory:  # as the Trainer does
        keep_freed_memory_for_reuse()
    before_model = peak_memory_mb(device)
    torch.manual_seed(seed)
    model = use_activation_checkpointing(build_detector(cfg.model, num_classes).to(device), cfg.train.activation_checkpointing)
    criterion = build_criterion(model, cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler("cuda") if needs_grad_scaler(device, cfg.train.amp) else None
    images, masks, targets = synthetic_batch(batch, size_hw[0], size_hw[1], num_classes, device, seed)
    data = Batch(images, masks, targets)
    model.train()
    times = time_iterations(lambda: train_step(model, criterion, data, optimizer, cfg, scaler), device, iters, warmup)
    return {"times": times, "seconds": statistics.median(times), "peak_mb": peak_memory_mb(device),
            "params": sum(p.numel() for p in model.parameters()), "peak_mb_before_model": before_model}


# -- the table -------------------------------------------------------------------------------------


@dataclass
class ProfileRow:
    config: str  # the label given, e.g. "co_tiny"
    preset: str
    method: str  # model.method resolved: deformable_detr, h_detr, group_detr, co_detr
    k: int  # number of auxiliary heads
    heads: str  # "atss+faster_rcnn", or "-" for the baseline
    seconds_per_iter: float  # median
    x_baseline: float  # seconds_per_iter / the baseline's
    peak_mb: float
    memory: str  # "cuda_max_allocated" or "cpu_peak_rss"
    params_m: float  # parameters in millions, training-only ones included
    peak_mb_before_model: float  # CPU: the interpreter + torch alone (the peak RSS before the model existed)
    times: list[float]
    size: str  # "HxW"
    batch: int
    device: str


def parse_size(text: str) -> tuple[int, int]:
    """'256x320' -> (256, 320) (height x width)."""
    parts = text.lower().split("x")
    try:
        height, width = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 256x256") from None
    if height < 32 or width < 32:
        raise ConfigError(f"--size {text!r}: both sides must be at least 32 pixels")
    if height > 4096 or width > 4096:  # larger inputs exhaust memory (a transformer over every stride-8 token)
        raise ConfigError(f"--size {text!r}: both sides must be at most 4096 pixels")
    return height, width


def _measure_in_subprocess(cfg: Config, size_hw: tuple[int, int], batch: int, iters: int, warmup: int,
                           device: torch.device, num_classes: int, seed: int) -> dict:
    spec = {"config": cfg.to_dict(), "size": list(size_hw), "batch": batch, "iters": iters, "warmup": warmup,
            "device": str(device), "num_classes": num_classes, "seed": seed}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "analysis.profile", "--worker"], input=json.dumps(spec), text=True,
                          capture_output=True, cwd=REPO, env=env)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        raise RuntimeError(f"profiling {cfg.preset} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(results[-1][len("RESULT "):])


def profile_configs(configs: Sequence[tuple[str, Config]], size_hw: tuple[int, int], batch: int, iters: int = 5,
                    warmup: int = 1, device: str | torch.device = "cpu", num_classes: int = 80, seed: int = 0,
                    isolate: bool = True, progress: bool = True) -> list[ProfileRow]:
    """One ProfileRow per (label, config), in order; see the module docstring."""
    if iters < 1 or warmup < 0:
        raise ConfigError(f"--iters={iters} / warmup={warmup}: expected iters >= 1 and warmup >= 0")
    if batch < 1:
        raise ConfigError(f"--batch={batch}: expected at least 1")
    device = torch.device(device)
    measure = _measure_in_subprocess if isolate else measure_training_step
    rows = []
    columns = (TextColumn("profile {task.fields[config]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("profile", total=len(configs), config="")
        for label, cfg in configs:
            bar.update(task, config=label)
            result = measure(cfg, size_hw, batch, iters, warmup, device, num_classes, seed)
            heads = cfg.model.aux.heads
            rows.append(ProfileRow(label, cfg.preset, resolved_method(cfg.model), len(heads), "+".join(heads) or "-",
                                   result["seconds"], 1.0,
                                   result["peak_mb"], memory_kind(device), result["params"] / 1e6,
                                   result["peak_mb_before_model"], result["times"],
                                   f"{size_hw[0]}x{size_hw[1]}", batch, str(device)))
            bar.advance(task)
    baseline = next((row for row in rows if row.method == "deformable_detr"), rows[0] if rows else None)
    for row in rows:
        row.x_baseline = row.seconds_per_iter / baseline.seconds_per_iter
    return rows


def write_profile(out_dir: Path, rows: list[ProfileRow]) -> dict[str, Path]:
    """Atomically write profile.csv (one row per config) and profile.json."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [name for name in ProfileRow.__dataclass_fields__ if name != "times"]
    writer.writerow(columns)
    for row in rows:
        writer.writerow([getattr(row, name) for name in columns])
    paths = {"csv": out_dir / "profile.csv", "json": out_dir / "profile.json"}
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_json(paths["json"], [asdict(row) for row in rows])
    return paths


def _worker() -> None:
    """Read a measurement spec (JSON) from stdin, print `RESULT {json}` (see _measure_in_subprocess)."""
    spec = json.loads(sys.stdin.read())
    result = measure_training_step(config_from_dict(spec["config"]), tuple(spec["size"]), spec["batch"], spec["iters"],
                                   spec["warmup"], torch.device(spec["device"]), spec["num_classes"], spec["seed"])
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("internal entry point of analysis.profile; use `codetr profile`")
    _worker()
