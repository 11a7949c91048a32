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
from rich.markup import escape

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
            # escape: a message quoting a value such as heads=[atss,fcos] must not be read as rich markup
            console.print(f"[bold red]error:[/] {escape(one_line(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:  # Ctrl-C: say how to go on, exit 130 as shells expect
            console.print(f"interrupted{resume_hint(command.__name__)}", highlight=False, soft_wrap=True, markup=False)
            raise typer.Exit(code=130) from None

    return wrapper


def check_writable_out(out: Path, file: bool = False) -> None:
    """Refuse an unusable --out (a file where a folder is expected, under a file, unwritable) before any work."""
    from codetr.io import check_writable_dir, check_writable_file

    (check_writable_file if file else check_writable_dir)(out, "--out")


def resume_hint(command_name: str) -> str:
    """How to continue an interrupted command (written results are never lost: writes are atomic)."""
    import shlex

    typed = "codetr " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    if command_name == "train":
        again = typed if "--resume" in sys.argv else typed + " --resume"
        return f"; continue from the last checkpoint with: {again}"
    if command_name == "ablate":
        return (f"; finished runs are kept, and running the same command again resumes the others from their last "
                f"checkpoint: {typed}")
    return ""


def resolve_config(preset: str, overrides: list[str], data: Optional[Path], epochs: Optional[int]):
    from codetr.config import apply_overrides, epochs_overrides, get_preset

    extra = []
    if data is not None:
        extra.append(f"data.root={data}")
    if epochs is not None:  # the lr drop moves with the schedule; --set optim.lr_drop_epochs=... pins it
        extra.extend(epochs_overrides(preset, epochs))
    return apply_overrides(get_preset(preset), extra + list(overrides))


@app.command()
@user_errors
def train(
    out: Path = typer.Option(..., "--out", help="Output directory (checkpoints, log.jsonl, metrics.json)."),
    preset: str = typer.Option("tiny", "--preset", help="Config preset, see `codetr presets`."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder; default: the generated dataset."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Number of epochs (overrides the preset; the lr drop keeps its place in the schedule)."),
    overrides: List[str] = typer.Option([], "--set", help="Config override KEY=VALUE, repeatable."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
    device: str = typer.Option("", "--device", help="cpu, cuda, cuda:1; default: cuda if available."),
) -> None:
    """Train a detector (under `torchrun --nproc_per_node N` it trains with DDP)."""
    from codetr.engine.train import train as run_training

    check_writable_out(out)
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
    branch: List[str] = typer.Option([], "--branch", help="detr (default: the one-to-one head), an auxiliary head by its log name (atss, faster_rcnn, atss_2, ...) or all; repeatable."),
) -> None:
    """COCO-evaluate a checkpoint on the validation split; writes metrics.json and detections.json (another
    branch: metrics_<branch>.json, detections_<branch>.json)."""
    from codetr.engine.branch_eval import DETR, branch_table, evaluate_checkpoint

    run = evaluate_checkpoint(ckpt, data, overrides, device, not no_ema, list(branch), out)
    if not run.is_main:
        return
    if run.branches == [DETR]:
        print_metrics(run.metrics[DETR])
        console.print(f"wrote {run.paths[DETR][0]} and {run.paths[DETR][1]}")
    else:
        Console().print(branch_table(run.metrics))
        files = ", ".join(f"{m.name} + {d.name}" for m, d in run.paths.values())
        console.print(f"wrote {files} to {next(iter(run.paths.values()))[0].parent}", soft_wrap=True, highlight=False)


@app.command()
@user_errors
def predict(
    ckpt: Path = typer.Option(..., "--ckpt"),
    image: Optional[Path] = typer.Option(None, "--image", help="One image: its detections are drawn to the PNG --out."),
    images: Optional[str] = typer.Option(None, "--images", help="A folder or a quoted glob ('dir/**/*.jpg'): writes OUT/detections.json (COCO results, as `codetr eval`'s)."),
    out: Path = typer.Option(..., "--out", help="--image: the PNG to write; --images: the output folder."),
    ann: Optional[Path] = typer.Option(None, "--ann", help="--images: take image ids from this COCO file's images (matched on file_name); default: 1..N in file-name order, listed in OUT/images.json."),
    draw: bool = typer.Option(False, "--draw", help="--images: also draw each image to OUT/drawn/<name>.png."),
    threshold: float = typer.Option(0.3, "--threshold", help="Draw detections scoring at least this (detections.json keeps all)."),
    device: str = typer.Option("", "--device"),
) -> None:
    """Detect objects in one image and draw them, or in a folder of images and write COCO results."""
    if not 0 <= threshold <= 1:  # also refuses NaN
        raise CodetrError(f"--threshold {threshold}: expected a score in [0, 1]")
    if (image is None) == (images is None):
        given = "give --image or --images, not both" if image is not None else "give --image IMG or --images DIR_OR_GLOB"
        raise CodetrError(f"{given} (--image: one image drawn to the PNG --out; --images: COCO results in the folder --out)")
    if images is not None:
        from codetr.engine.batch_predict import run_batch_predict

        done = run_batch_predict(ckpt, images, out, ann, threshold if draw else None, device, console)
        for line in done.summary():
            console.print(line, soft_wrap=True, highlight=False, markup=False)
        return
    if ann is not None or draw:
        raise CodetrError("--ann and --draw go with --images, not with --image")
    from codetr.engine.distributed import init_distributed
    from codetr.engine.inference import load_detector, open_image, predict_image
    from codetr.io import check_writable_file
    from codetr.visualize import draw_detections, save_png

    check_writable_file(out, "--out")  # before the model runs
    detector = load_detector(ckpt, init_distributed(device).device)
    picture = open_image(image)
    result = predict_image(detector, picture)
    drawn = draw_detections(picture, result["boxes"], result["labels"], result["scores"], detector.class_names, threshold)
    save_png(drawn, out)
    kept = int((result["scores"] >= threshold).sum())
    best = float(result["scores"].max()) if len(result["scores"]) else 0.0
    hint = f" (highest score {best:.2f}: lower --threshold to draw more)" if kept == 0 else ""
    console.print(f"{kept} detections >= {threshold} drawn to {out}{hint}")


@app.command("convert")
@user_errors
def convert_command(
    src: Path = typer.Argument(..., help="A released checkpoint (.pth): Sense-X Co-DETR or mmdetection 3.x."),
    out: Path = typer.Option(..., "--out", help="The codetr checkpoint to write (.pt)."),
    source: Optional[str] = typer.Option(None, "--from", help="mmdet3 or sensex; default: read off the key names."),
) -> None:
    """Convert a released checkpoint to an ordinary codetr checkpoint (read without running its pickle code).

    Every command's --ckpt also takes the foreign file directly (converted in memory)."""
    check_writable_out(out, file=True)
    from codetr.convert import convert_file, describe_skipped
    from codetr.engine.checkpoint import save_checkpoint

    converted = convert_file(src, source)
    state = converted.checkpoint
    save_checkpoint(out, {k: v for k, v in state.items() if k != "format_version"})
    model = state["config"]["model"]
    heads = "+".join(model["aux"]["heads"]) or "none"
    backbone = model["backbone"]
    backbone_name = f"ResNet-{backbone['depth']}" if backbone["kind"] == "resnet" else f"Swin-{backbone['kind'][5:].upper()}"
    console.print(f"converted {src} ({converted.source}): {len(state['model'])} tensors, {backbone_name}, "
                  f"{model['transformer']['num_encoder_layers']}+{model['transformer']['num_decoder_layers']} layers, "
                  f"{model['num_queries']} queries, {state['num_classes']} classes, auxiliary heads {heads}",
                  soft_wrap=True, highlight=False, markup=False)
    for line in describe_skipped(converted.skipped_keys):
        console.print(f"skipped {line}", soft_wrap=True, highlight=False, markup=False)
    if converted.skipped_entries:
        console.print(f"not read: {', '.join(converted.skipped_entries)}"
                      + (f" (OpenMMLab objects kept as inert records: {', '.join(converted.stand_ins)})" if converted.stand_ins else ""),
                      soft_wrap=True, highlight=False, markup=False)
    data = state["config"]["data"]
    console.print("data: large-scale jitter, 1024 x 1024 inputs (the checkpoint's config says so)" if data["lsj"] else
                  "data: the preset's resize (the checkpoint's config names no LSJ; --set data.lsj=true if it was)",
                  soft_wrap=True, highlight=False, markup=False)
    console.print(f"wrote {out} (preset {state['config']['preset']}; classes {state['class_names'][0]}, ...)",
                  soft_wrap=True, highlight=False, markup=False)


@app.command()
@user_errors
def ablate(
    params: List[str] = typer.Option([], "--param", help="Parameter: lambda1, lambda2, num_convs, aux_heads, method (deformable_detr, h_detr, group_detr, co_detr: model.method and the heads it implies), num_queries, epochs, lr or a dotted config key. Repeat for a product grid."),
    values: List[str] = typer.Option([], "--values", help="Comma-separated values of the preceding --param, e.g. 0.25,0.5,1,2 (aux_heads: atss+faster_rcnn, none)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="YAML grid spec with an explicit list of points, e.g. experiments/supp_table2_lambdas.yaml."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Base preset (default: the spec's, else co_tiny)."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder; default: the generated dataset."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs per run (default 3: a short schedule)."),
    max_iters: Optional[int] = typer.Option(None, "--max-iters", help="Cap on iterations per epoch (default 128; 0 = full epochs)."),
    seeds: str = typer.Option("", "--seeds", help="Seeds per point, e.g. 0,1,2 (default: the spec's, else 0)."),
    overrides: List[str] = typer.Option([], "--set", help="Base config override KEY=VALUE, repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", help="Grid folder (default: runs/<grid name>). Re-running resumes it."),
    baseline: str = typer.Option("", "--baseline", help="The point deltas are measured against, e.g. lambda1=1 (default: the point equal to the base config)."),
    launcher: str = typer.Option("parallel", "--launcher", help="parallel (default: --workers runs at a time sharing the CPU cores, or one run per --gpus-per-run GPUs), local (one at a time, all cores), or slurm (submitit)."),
    workers: int = typer.Option(2, "--workers", help="parallel launcher on CPU: concurrent runs (on GPUs: one run per --gpus-per-run GPUs)."),
    gpus_per_run: int = typer.Option(1, "--gpus-per-run", help="GPUs per run; more than 1 runs it under torchrun (DDP)."),
    slurm_partition: str = typer.Option("", "--slurm-partition"),
    slurm_time: int = typer.Option(240, "--slurm-time", help="Slurm time limit per job in minutes (jobs requeue on timeout)."),
    device: str = typer.Option("", "--device", help="cpu, cuda; default: cuda if available."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Re-run runs recorded as failed."),
    allow_changed_base: bool = typer.Option(False, "--allow-changed-base", help="Accept a base config that differs from the grid's manifest (changed runs restart; old ones are kept aside)."),
    metrics: str = typer.Option("AP,AP50,AP75,APs,APm,APl", "--metrics", help="Table columns."),
    paper_setting: bool = typer.Option(False, "--paper-setting", help="With --grid: train the spec's paper_preset for its paper_epochs full epochs (the paper's own setting: R50 on COCO, a GPU job)."),
) -> None:
    """Run an ablation grid (one training + evaluation per point and seed) and print the paper-style table."""
    from experiments.ablate import Schedule, grid_from_flags, parse_baseline, parse_seeds, run_grid
    from experiments.grid import DEFAULT_EPOCHS, DEFAULT_MAX_ITERS, load_spec
    from experiments.launchers import LaunchOptions
    from experiments.table import check_metrics, rich_table, table_console

    metric_names = check_metrics([m.strip() for m in metrics.split(",") if m.strip()])
    if grid is not None:
        if params or values:
            raise CodetrError("give either --grid FILE or --param/--values, not both")
        spec, schedule_of_spec = load_spec(grid)
    else:
        if not params or len(params) != len(values):
            raise CodetrError(f"expected one --values per --param (got {len(params)} --param, {len(values)} --values), "
                              "e.g. --param lambda1 --values 0.25,0.5,1,2")
        spec, schedule_of_spec = grid_from_flags(list(zip(params, values))), {}
    if paper_setting:
        if "paper_preset" not in schedule_of_spec:
            raise CodetrError("--paper-setting needs a --grid spec with paper_preset and paper_epochs "
                              "(e.g. experiments/supp_table2_lambdas.yaml)")
        spec.preset = schedule_of_spec["paper_preset"]
        spec.name += "-paper"  # its own default folder, beside the CPU analogue's
        schedule_of_spec = {"epochs": schedule_of_spec.get("paper_epochs", 12), "max_iters": 0}
    spec.preset = preset or spec.preset
    spec.overrides = spec.overrides + list(overrides)
    spec.seeds = parse_seeds(seeds) if seeds else spec.seeds
    spec.baseline = parse_baseline(baseline) if baseline else spec.baseline
    schedule = Schedule(epochs=epochs if epochs is not None else schedule_of_spec.get("epochs", DEFAULT_EPOCHS),
                        max_iters=max_iters if max_iters is not None else schedule_of_spec.get("max_iters", DEFAULT_MAX_ITERS))
    options = LaunchOptions(launcher=launcher, workers=workers, gpus_per_run=gpus_per_run, device=device,
                            slurm_partition=slurm_partition, slurm_time_min=slurm_time)
    grid_dir = out if out is not None else Path("runs") / spec.name
    table = run_grid(spec, grid_dir, schedule, data, options, retry_failed=retry_failed,
                     allow_changed_base=allow_changed_base, metrics=metric_names,
                     log=lambda text: console.print(escape(text), soft_wrap=True, highlight=False))
    table_console().print(rich_table(table))
    console.print(f"wrote {escape(str(grid_dir))}/results.csv, results.md, results.tex and plot_<metric>.png", soft_wrap=True)
    failed = int(table.points["seeds_failed"].sum())
    unfinished = len(table.unfinished)
    if failed:
        console.print(f"[bold red]error:[/] {failed} run(s) failed (see the table and each run's run.log); "
                      "fix the cause and re-run with --retry-failed", highlight=False)
    if unfinished:
        console.print(f"[bold red]error:[/] {unfinished} run(s) did not finish ({escape(', '.join(table.unfinished))}): "
                      "killed by a signal, or running elsewhere; run the same command again to resume them from "
                      "their last checkpoint", highlight=False, soft_wrap=True)
    if failed or unfinished:
        raise typer.Exit(code=1)


@app.command()
@user_errors
def table(
    grid_dir: Path = typer.Argument(..., help="A grid folder written by `codetr ablate`."),
    fmt: str = typer.Option("", "--format", help="Print as md, latex or csv instead of a terminal table."),
    metrics: str = typer.Option("AP,AP50,AP75,APs,APm,APl", "--metrics", help="Columns, e.g. AP,AP50,APs."),
) -> None:
    """Tabulate a grid (also rewrites its results.csv/.md/.tex and plots)."""
    from experiments.table import check_metrics, load_table, render, rich_table, table_console, write_results

    result = load_table(grid_dir, check_metrics([m.strip() for m in metrics.split(",") if m.strip()]))
    write_results(grid_dir, result)
    if fmt:
        typer.echo(render(result, fmt), nl=False)
    else:
        table_console().print(rich_table(result))


@app.command()
def presets() -> None:
    """List the config presets."""
    from codetr.presets import PRESETS

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


@app.command("conflicts")
@user_errors
def conflicts_command(
    ckpt: List[Path] = typer.Option(..., "--ckpt", help="Co-DETR checkpoint; repeat to compare several (side-by-side heatmap)."),
    out: Path = typer.Option(..., "--out", help="Output folder (one subfolder per checkpoint when several)."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder; default: the checkpoint's data."),
    split: str = typer.Option("val", "--split", help="train or val (always with the test transforms)."),
    num_images: int = typer.Option(32, "--num-images", help="Images used: the first ones of the split that have boxes."),
    target: str = typer.Option("loss", "--target", help="Per head: loss (its training loss vs. the ground truth) or score (its top-100 class scores)."),
    posq: bool = typer.Option(False, "--posq", help="Also each head's positive-query branch (posq.<head>)."),
    overlays: int = typer.Option(4, "--overlays", help="CAM overlay PNGs for the first N images."),
    seed: int = typer.Option(0, "--seed", help="Seeds the auxiliary branches' sampling (image n uses seed + n)."),
    option: List[str] = typer.Option([], "--option", help="Any CamOptions / ConflictOptions field KEY=VALUE, e.g. level_weighting=normalized, epsilon=0, levels=0,1, kl_reduction=mean; repeatable."),
    device: str = typer.Option("", "--device", help="cpu, cuda, cuda:1; default: cuda if available."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw weights even if EMA weights exist."),
) -> None:
    """Head conflicts (Co-DETR Figs. 1-2): each head's Grad-CAM on the encoder output, S_ij = mean KL, S_i.

    Writes conflicts.csv, conflicts.json (per-image values), conflicts_heatmap.png and overlays/*.png.
    A checkpoint without auxiliary heads is an error.
    """
    from analysis.conflict_plots import plot_conflict_matrices
    check_writable_out(out)
    from analysis.conflicts import (ConflictOptions, analyze_checkpoint, conflict_options, conflict_table,
                                    write_conflicts)
    from analysis.figures import save_figure
    from analysis.gradcam import CamOptions
    from analysis.labels import checkpoint_labels
    from codetr.engine.distributed import init_distributed
    from codetr.errors import CheckpointError, ConfigError

    if overlays < 0:
        raise ConfigError(f"--overlays must be >= 0, got {overlays}")
    missing = [str(path) for path in ckpt if not path.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint not found: {', '.join(missing)}")
    options = conflict_options(option, ConflictOptions(CamOptions(target=target, include_posq=posq),
                                                       num_images=num_images, split=split, seed=seed))
    run_device = init_distributed(device).device
    labels = checkpoint_labels(ckpt)
    results = []
    for path, label in zip(ckpt, labels):
        result = analyze_checkpoint(path, run_device, data, options, keep_examples=overlays, use_ema=not no_ema, label=label)
        write_conflicts(result, out / label.replace("/", "_") if len(ckpt) > 1 else out)
        Console().print(conflict_table(result))
        results.append(result)
    if len(ckpt) > 1:
        save_figure(plot_conflict_matrices(results), out / "conflicts_heatmap.png")
        console.print(f"wrote the side-by-side {out / 'conflicts_heatmap.png'} and one folder per checkpoint "
                      "(conflicts.csv, conflicts.json, conflicts_heatmap.png, overlays/)", soft_wrap=True, highlight=False)
    else:
        console.print(f"wrote conflicts.csv, conflicts.json, conflicts_heatmap.png and overlays/ to {out}",
                      soft_wrap=True, highlight=False)


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

    check_writable_out(out)
    path = generate_synthetic_coco(out, num_train=num_train, num_val=num_val, seed=seed)
    console.print(f"wrote {num_train} train + {num_val} val images to {path}")


@app.command("iof-iob")
@user_errors
def iof_iob_command(
    ckpt: List[Path] = typer.Option([], "--ckpt", help="Checkpoint; repeat to compare several (one curve each)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="A `codetr ablate` folder: one curve per finished point (its lowest seed's last.pt, seed 0), labelled by the point, e.g. method=h_detr."),
    out: Path = typer.Option(..., "--out", help="Output folder: iof_iob.png, curves.csv, auc.csv, iof_iob.json."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder; default: each checkpoint's data."),
    num_images: int = typer.Option(64, "--num-images", help="The first N validation images."),
    aggregate: str = typer.Option("pooled", "--aggregate", help="Plotted and printed: pooled (pixels summed over images) or per-image (mean of per-image curves). The CSVs hold both."),
    variants: List[str] = typer.Option(["encoder", "decoder"], "--variant", help="encoder (the paper's feature discriminability) and/or decoder (the last layer's attention)."),
    top_queries: int = typer.Option(10, "--top-queries", help="Decoder variant: the best-scoring queries per image, weighted by score."),
    thresholds: int = typer.Option(101, "--thresholds", help="Points reported per curve (the AUC always uses 100k thresholds)."),
    spacing: str = typer.Option("quantile", "--spacing", help="Reported thresholds: quantile (spread along the curve) or uniform (S evenly over [0, 1])."),
    device: str = typer.Option("", "--device", help="cpu, cuda, cuda:1; default: cuda if available."),
) -> None:
    """IoF-IoB curves (Co-DETR's feature discriminability): how well the encoder features, and the decoder's
    attention, separate the ground-truth boxes from the background; with the area under each curve."""
    check_writable_out(out)
    from rich.table import Table

    from analysis.iof_iob import AGGREGATES, run_iof_iob, write_iof_iob
    from codetr.engine.distributed import init_distributed
    from codetr.errors import ConfigError

    aggregate = aggregate.replace("-", "_")
    if aggregate not in AGGREGATES:
        raise ConfigError(f"--aggregate {aggregate!r}: expected pooled or per-image")
    if not ckpt and grid is None:
        raise ConfigError("give --ckpt CHECKPOINT (repeatable), --grid GRID_FOLDER, or both")
    checkpoints, labels = list(ckpt), None
    if grid is not None:  # the grid's points, labelled as in its table; any --ckpt keeps its path label
        from analysis.labels import checkpoint_labels
        from experiments.store import finished_checkpoints

        found, unfinished = finished_checkpoints(grid)
        if unfinished:
            console.print(f"skipping the unfinished points {'; '.join(unfinished)}", soft_wrap=True, highlight=False,
                          markup=False)
        labels = (checkpoint_labels(ckpt) if ckpt else []) + [label for label, _ in found]
        checkpoints += [path for _, path in found]
    results = run_iof_iob(checkpoints, data, num_images, init_distributed(device).device, variants, top_queries,
                          thresholds, spacing, labels=labels)
    paths = write_iof_iob(out, results, aggregate)
    table = Table(title=f"IoF-IoB area under the curve ({results[0].num_images} images; 0.5 = chance)")
    for name in ("checkpoint", "variant", "AUC pooled", "AUC per-image", "images"):
        table.add_column(name, justify="left" if name in ("checkpoint", "variant") else "right")
    for r in results:
        table.add_row(r.checkpoint, r.variant, f"{r.curves['pooled'].auc:.4f}", f"{r.curves['per_image'].auc:.4f}",
                      str(r.num_images))
    Console().print(table)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", soft_wrap=True, highlight=False)


@app.command("positives")
@user_errors
def positives_command(
    preset: Optional[str] = typer.Option(None, "--preset", help="Preset with auxiliary heads, e.g. co_tiny (with --ckpt it must be the checkpoint's)."),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="Trained checkpoint. Without one the model is freshly initialised, and Faster-RCNN / PAA counts reflect untrained proposals."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder; default: the config's data."),
    num_images: int = typer.Option(64, "--num-images", help="The first N validation images."),
    overrides: List[str] = typer.Option([], "--set", help="Config override KEY=VALUE (with --ckpt: data.* keys only)."),
    seed: int = typer.Option(0, "--seed", help="Seeds Faster-RCNN's RoI sampling (which RoIs, not how many)."),
    device: str = typer.Option("", "--device", help="cpu, cuda, cuda:1; default: cuda if available."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write positives.csv and positives.json here."),
) -> None:
    """Positive samples per ground-truth box of each auxiliary head's one-to-many assignment (before the
    300-query cap), as sum(pos)/sum(gt) and as the mean of per-image ratios."""
    if out is not None:
        check_writable_out(out)
    from rich.table import Table

    from analysis.positives import run_positives, write_positives
    from codetr.engine.distributed import init_distributed

    report = run_positives(preset, ckpt, data, num_images, overrides, init_distributed(device).device, seed)
    table = Table(title=f"positives per GT box: {report.source}, {report.num_images} val images")
    for name in ("head", "images", "GTs", "positives", "pos/GT", "mean/image", "paper COCO"):
        table.add_column(name, justify="left" if name == "head" else "right", no_wrap=True)
    for row in report.heads:
        table.add_row(row.head + (" *" if row.depends_on_weights and not report.trained else ""), str(row.images),
                      str(row.gts), str(row.positives), f"{row.ratio:.2f}", f"{row.mean_image_ratio:.2f}",
                      "-" if row.paper_coco is None else f"{row.paper_coco:.1f}")
    Console().print(table)
    if not report.trained and any(row.depends_on_weights for row in report.heads):
        console.print("* assigns from the model's predictions, here untrained (give --ckpt for a trained model)")
    if out is not None:
        paths = write_positives(out, report)
        console.print(f"wrote {paths['csv']} and {paths['json']}", soft_wrap=True, highlight=False)


@app.command("profile")
@user_errors
def profile_command(
    preset: List[str] = typer.Option(..., "--preset", help="Preset to profile; repeat for one row each (e.g. --preset tiny --preset co_tiny)."),
    overrides: List[str] = typer.Option([], "--set", help="Config override KEY=VALUE applied to every preset."),
    iters: int = typer.Option(5, "--iters", help="Timed training iterations (the median is reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed iterations first."),
    size: Optional[str] = typer.Option(None, "--size", help="Input HxW; default: the first preset's data.test_size, square."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Images per iteration; default: the first preset's data.batch_size."),
    num_classes: int = typer.Option(80, "--num-classes"),
    device: str = typer.Option("", "--device", help="cpu, cuda, cuda:1; default: cuda if available."),
    in_process: bool = typer.Option(False, "--in-process", help="Measure every config in this process (on CPU the peak memory then only grows)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write profile.csv and profile.json here."),
) -> None:
    """Training cost per config, like the paper's cost table: s/iter (median), x baseline, peak memory."""
    if out is not None:
        check_writable_out(out)
    from rich.table import Table

    from analysis.profile import parse_size, profile_configs, write_profile
    from codetr.engine.distributed import init_distributed
    from codetr.errors import ConfigError

    repeated = sorted({name for name in preset if preset.count(name) > 1})
    if repeated:
        raise ConfigError(f"--preset {repeated[0]} is given twice")
    for flag, value in (("--num-classes", num_classes), ("--iters", iters), ("--batch", batch or 1)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: expected >= 1")
    configs = [(name, resolve_config(name, overrides, None, None)) for name in preset]
    first = configs[0][1]
    size_hw = parse_size(size if size is not None else f"{first.data.test_size}x{first.data.test_size}")
    batch_size = batch if batch is not None else first.data.batch_size
    run_device = init_distributed(device).device
    rows = profile_configs(configs, size_hw, batch_size, iters, warmup, run_device, num_classes,
                           isolate=not in_process)
    memory = "CUDA max allocated" if run_device.type == "cuda" else "process peak RSS"
    table = Table(title=f"training iteration: {size_hw[0]}x{size_hw[1]} x {batch_size} images on {run_device}, "
                        f"median of {iters}; peak MB = {memory}")
    for name in ("config", "method", "s/iter", "x baseline", "peak MB", "params M"):
        table.add_column(name, justify="left" if name in ("config", "method") else "right", no_wrap=name != "method")
    for row in rows:
        method = f"{row.method} {row.heads}" if row.k else row.method  # Co-DETR: its K heads, e.g. atss+faster_rcnn
        table.add_row(row.config, method, f"{row.seconds_per_iter:.3f}", f"{row.x_baseline:.2f}",
                      f"{row.peak_mb:.0f}", f"{row.params_m:.1f}")
    Console().print(table)
    if out is not None:
        paths = write_profile(out, rows)
        console.print(f"wrote {paths['csv']} and {paths['json']}", soft_wrap=True, highlight=False)


@app.command("instability")
@user_errors
def instability_command(
    out: Path = typer.Option(..., "--out", help="Output folder: instability.csv, instability.json, instability.png."),
    ckpt: List[Path] = typer.Option([], "--ckpt", help="A checkpoint of one run; repeat, in epoch order (at least 2)."),
    run: List[Path] = typer.Option([], "--run", help="A training run folder: its epoch_XXX.pt in epoch order, named by the folder; repeatable."),
    label: Optional[str] = typer.Option(None, "--label", help="Name of the --ckpt run (default: its folder's name)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="A `codetr ablate` folder: one run per finished point (seed 0), labelled by the point, e.g. method=h_detr (train it with --set train.keep_epoch_checkpoints=true)."),
    data: Optional[Path] = typer.Option(None, "--data", help="COCO 2017-layout folder for every run; default: each run's own data."),
    split: str = typer.Option("val", "--split", help="train or val (always with the test transforms)."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="The first N images of the split (default: all)."),
    layer: int = typer.Option(-1, "--layer", help="Decoder layer whose predictions are matched (-1 = last)."),
    ema: bool = typer.Option(False, "--ema", help="Match with the EMA weights (default: the raw weights training matched with)."),
    device: str = typer.Option("", "--device", help="cpu, cuda, cuda:1; default: cuda if available."),
) -> None:
    """Matching instability IS (Co-DETR Fig. 5, DN-DETR's definition): per pair of consecutive checkpoints, the
    ground-truth boxes the Hungarian matching gives to a different query (mean per image, and as a fraction)."""
    from analysis.instability import instability_table, resolve_runs, run_instability, write_instability
    check_writable_out(out)
    from codetr.engine.distributed import init_distributed

    grid_runs = []
    if grid is not None:
        from experiments.store import finished_checkpoints

        found, unfinished = finished_checkpoints(grid)
        grid_runs = [(point, checkpoint.parent) for point, checkpoint in found]
        if unfinished:
            console.print(f"skipped unfinished points: {', '.join(unfinished)}", highlight=False)
    runs = resolve_runs(ckpt, label, run, grid_runs)
    frame = run_instability(runs, data, split, max_images, layer, init_distributed(device).device, use_ema=ema)
    settings = {"split": split, "max_images": max_images, "layer": layer, "ema": ema, "data": data,
                "runs": {r.label: [str(p) for p in r.checkpoints] for r in runs}}
    paths = write_instability(out, frame, settings)
    Console().print(instability_table(frame))
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", soft_wrap=True, highlight=False)


@app.command("export")
@user_errors
def export_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint file (e.g. RUN/last.pt; a released .pth too)."),
    out: Path = typer.Option(..., "--out", help="File to write: .onnx, .pt2 (torch.export) or, with --weights-only, .pt."),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx, torch-export or weights; default: read off --out (.onnx, .pt2)."),
    weights_only: bool = typer.Option(False, "--weights-only", help="Write a checkpoint with the model weights alone (same as --format weights)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Export the raw weights even if EMA weights exist."),
    image: Optional[Path] = typer.Option(None, "--image", help="Also run the export on this image (onnxruntime / the .pt2 program) and print its largest differences from PyTorch."),
) -> None:
    """Export the deployed detector (ONNX, torch.export) or a weights-only checkpoint.

    The graph is the one-to-one detector (EMA weights if present) with the pure-PyTorch deformable attention and the top-k post-processing; batch, height and width are dynamic (each side at least the largest stride + 1: 65 px).

    Inputs: images [B,3,H,W] float32, normalised as the test transform does (ImageNet mean/std), zero padding; masks [B,H,W] bool, True = padding; orig_sizes [B,2] float32, the (h, w) the boxes are scaled to (the original image's size).

    Outputs: scores [B,K] descending; labels [B,K] int64 class index; boxes [B,K,4] xyxy in orig_sizes pixels; logits [B,Q,C] and pred_boxes [B,Q,4] (cxcywh normalised) of the last decoder layer. K = model.num_detections; Co-DINO's soft-NMS is not in the graph. Class names, category ids, resize and normalisation: the ONNX metadata, or codetr.json in a .pt2.

    A weights-only checkpoint drops the optimizer, scheduler and RNG states (and the raw or EMA copy): every --ckpt command loads it, train --resume refuses it."""
    from codetr.engine.export import run_export

    for line in run_export(ckpt, out, fmt, weights_only, not no_ema, image):
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def print_metrics(metrics: dict[str, float]) -> None:
    """Two short lines (AP family, AR family) that fit an 80-column terminal."""
    for prefix in ("AP", "AR"):
        typer.echo("  ".join(f"{name} {value:.3f}" for name, value in metrics.items() if name.startswith(prefix)))


if __name__ == "__main__":
    sys.exit(app())
