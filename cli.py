"""The `codetr` command: train, evaluate, predict, and make the generated dataset.

Bad input (a missing file, an unknown config key, a checkpoint of another architecture, ...) prints one
`error: ...` line and exits with status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from codetr.errors import CodetrError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Co-DETR research toolkit (pure PyTorch).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the embedded synthetic COCO-format data.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)


def one_line(error: CodetrError) -> str:
    """The user-facing line of an error. An error raised in a DataLoader worker comes back with the
    worker's traceback folded into its message; its original message is the traceback's last line."""
    text = str(error).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    return last.split(f"{type(error).__name__}: ", 1)[-1]


def user_errors(command: Callable) -> Callable:
    """Turn CodetrError into one readable line and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CodetrError as error:
            console.print(f"[bold red]error:[/] {one_line(error)}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def resolve_config(preset: str, overrides: list[str], data: Optional[Path], epochs: Optional[int]):
    from codetr.config import apply_overrides, get_preset

    extra = []
    if data is not None:
        extra.append(f"data.root={data}")
    if epochs is not None:
        extra.append(f"optim.epochs={epochs}")
    return apply_overrides(get_preset(preset), extra + list(overrides))


@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., "--out", help="Output directory (checkpoints, log.jsonl, metrics.json)."),
    preset: str = typer.Option("tiny", "--preset", help="Config preset, see `codetr presets`."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder; default: the generated dataset."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Number of epochs (overrides the preset)."),
    overrides: List[str] = typer.Option([], "--set", help="Config override KEY=VALUE, repeatable."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
    device: str = typer.Option("", "--device", help="cpu, cuda, cuda:1; default: cuda if available."),
) -> None:
    """Train a detector (under `torchrun --nproc_per_node N` it trains with DDP)."""
    from codetr.engine.train import train as run_training

    cfg = resolve_config(preset, overrides, data, epochs)
    metrics = run_training(cfg, out, resume=resume, device=device)
    if metrics:
        print_metrics(metrics)


@app.command("eval")
@user_errors
def evaluate_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint file (e.g. RUN/last.pt)."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder; default: the checkpoint's data."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where metrics.json / detections.json go (default: beside the checkpoint)."),
    overrides: List[str] = typer.Option([], "--set", help="Data overrides, e.g. data.val_ann=FILE."),
    device: str = typer.Option("", "--device"),
    no_ema: bool = typer.Option(False, "--no-ema", help="Evaluate the raw weights even if EMA weights exist."),
) -> None:
    """COCO-evaluate a checkpoint on the validation split; writes metrics.json and detections.json."""
    from codetr.config import apply_overrides
    from codetr.data.loaders import build_dataset, build_eval_loader
    from codetr.engine.distributed import init_distributed
    from codetr.engine.evaluate import evaluate, write_eval_outputs
    from codetr.engine.inference import load_detector
    from codetr.errors import DataError

    info = init_distributed(device)
    detector = load_detector(ckpt, info.device, use_ema=not no_ema)
    extra = [f"data.root={data}"] if data is not None else []
    data_cfg = apply_overrides(detector.cfg, extra + list(overrides)).data
    dataset = build_dataset(data_cfg, "val")
    if dataset.cat_ids != detector.cat_ids:
        raise DataError(f"{dataset.ann_file}: categories {dataset.cat_ids} differ from the checkpoint's {detector.cat_ids}")
    loader = build_eval_loader(dataset, data_cfg, info.rank, info.world_size)
    metrics, detections = evaluate(detector.model, loader, dataset.coco, dataset.cat_ids, info.device, progress=info.is_main)
    if info.is_main:
        out_dir = out if out is not None else ckpt.parent
        paths = write_eval_outputs(out_dir, metrics, detections, extra={"checkpoint": str(ckpt), "epoch": detector.epoch,
                                                                         "ann_file": str(dataset.ann_file)})
        print_metrics(metrics)
        console.print(f"wrote {paths[0]} and {paths[1]}")


@app.command()
@user_errors
def predict(
    ckpt: Path = typer.Option(..., "--ckpt"),
    image: Path = typer.Option(..., "--image"),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
    threshold: float = typer.Option(0.3, "--threshold", help="Draw detections scoring at least this."),
    device: str = typer.Option("", "--device"),
) -> None:
    """Detect objects in one image and draw them."""
    from codetr.engine.distributed import init_distributed
    from codetr.engine.inference import load_detector, open_image, predict_image
    from codetr.visualize import draw_detections, save_png

    detector = load_detector(ckpt, init_distributed(device).device)
    picture = open_image(image)
    result = predict_image(detector, picture)
    drawn = draw_detections(picture, result["boxes"], result["labels"], result["scores"], detector.class_names, threshold)
    save_png(drawn, out)
    kept = int((result["scores"] >= threshold).sum())
    best = float(result["scores"].max()) if len(result["scores"]) else 0.0
    hint = f" (highest score {best:.2f}: lower --threshold to draw more)" if kept == 0 else ""
    console.print(f"{kept} detections >= {threshold} drawn to {out}{hint}")


@app.command()
def presets() -> None:
    """List the config presets."""
    from codetr.config import PRESETS

    for name, factory in PRESETS.items():
        first_paragraph = (factory.__doc__ or "").strip().split("\n\n")[0]
        typer.echo(f"{name:28s} {' '.join(first_paragraph.split())}")


@app.command("config")
@user_errors
def show_config(
    preset: str = typer.Option("tiny", "--preset"),
    overrides: List[str] = typer.Option([], "--set"),
) -> None:
    """Print the resolved config of a preset with overrides, one dotted key per line."""
    from codetr.config import valid_keys

    cfg = resolve_config(preset, overrides, None, None)
    for key in valid_keys(cfg):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        typer.echo(f"{key} = {value}")


@data_app.command("synth")
@user_errors
def data_synth(
    out: Path = typer.Option(..., "--out"),
    num_train: int = typer.Option(512, "--num-train"),
    num_val: int = typer.Option(128, "--num-val"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a deterministic COCO-format dataset of rendered objects (COCO 2017 folder layout)."""
    from codetr.data.synth import generate_synthetic_coco

    path = generate_synthetic_coco(out, num_train=num_train, num_val=num_val, seed=seed)
    console.print(f"wrote {num_train} train + {num_val} val images to {path}")


def print_metrics(metrics: dict[str, float]) -> None:
    """Two short lines (AP family, AR family) that fit an 80-column terminal."""
    for prefix in ("AP", "AR"):
        typer.echo("  ".join(f"{name} {value:.3f}" for name, value in metrics.items() if name.startswith(prefix)))


if __name__ == "__main__":
    sys.exit(app())
