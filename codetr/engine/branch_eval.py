"""`codetr eval --branch`: COCO-evaluate the one-to-one head and/or Co-DETR's auxiliary heads on their own.

The paper's Table 11 (the released code's `eval_module` 'one-stage' / 'two-stage' with `eval_index`): an
auxiliary head, trained collaboratively, predicts with its own post-processing and NMS on the encoder output
(the auxiliary maps), beside the one-to-one head. Branch names are "detr" (the one-to-one head) and the heads'
log names ("atss", "faster_rcnn", "atss_2", ...); "all" is detr + every auxiliary head. All requested branches
share one forward pass per batch.

Files: detr keeps `metrics.json` / `detections.json`; another branch writes `metrics_<branch>.json` /
`detections_<branch>.json` (its metrics file also names the branch and its post-processing settings).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from torch import Tensor, nn

from codetr.engine.evaluate import Postprocess
from codetr.errors import ConfigError, DataError

if TYPE_CHECKING:
    from codetr.models.detector import DetectorOutput

DETR = "detr"  # the one-to-one head
ALL = "all"  # detr + every auxiliary head
TABLE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def model_branches(model: nn.Module) -> dict[str, str | None]:
    """Every branch of a model by name -> its auxiliary head kind (None for detr), in order."""
    aux = getattr(model, "aux", None)
    return {DETR: None, **(aux.kinds() if aux is not None else {})}


def resolve_branches(model: nn.Module, requested: list[str]) -> list[str]:
    """The branches to evaluate, in the order asked ("all" expanded, repeats dropped). A name the model does not
    have, or a head without inference, is a ConfigError naming the valid branches."""
    branches = model_branches(model)
    aux = getattr(model, "aux", None)
    evaluable = [name for name in branches if name == DETR or aux.can_detect(name)]
    valid = f"this checkpoint's branches: {', '.join(evaluable)} (or {ALL})"
    chosen: list[str] = []
    for name in requested or [DETR]:
        names = evaluable if name == ALL else [name]
        for branch in names:
            if branch not in branches:
                raise ConfigError(f"--branch {branch!r}: no such branch; {valid}")
            if branch not in evaluable:
                raise ConfigError(f"--branch {branch!r}: {branches[branch]} heads have no inference in codetr; {valid}")
            if branch not in chosen:
                chosen.append(branch)
    return chosen


def needs_aux(requested: list[str]) -> bool:
    """Whether the requested branches need the auxiliary heads' weights (anything but detr alone)."""
    return any(name != DETR for name in requested)


def branch_postprocess(model: nn.Module, branch: str) -> Postprocess:
    """The evaluation's Postprocess (outputs, masks [B, H, W], orig_sizes [B, 2]) -> per image results of one
    branch: the one-to-one head's `postprocess`, or the auxiliary head's `postprocess_aux`."""
    def postprocess(outputs: DetectorOutput, masks: Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        if branch == DETR:
            return model.postprocess(outputs, orig_sizes)
        return model.postprocess_aux(branch, outputs, masks, orig_sizes)

    return postprocess


def file_suffix(branch: str) -> str:
    """"" for detr (metrics.json, detections.json), "_<branch>" otherwise."""
    return "" if branch == DETR else f"_{branch}"


def postprocess_settings(model: nn.Module, branch: str) -> dict:
    """The branch's post-processing as plain values, for its metrics file."""
    if branch == DETR:
        return {}
    head = model.aux.heads[model.aux.names.index(branch)]
    configs = {name: getattr(head, name) for name in ("test_cfg", "rpn_test_cfg", "rcnn_test_cfg") if hasattr(head, name)}
    settings: dict = {name: cfg.as_dict() for name, cfg in configs.items()}
    if hasattr(head, "with_score_voting"):
        settings["score_voting"] = bool(head.with_score_voting)
    return settings


@dataclass
class BranchEvaluation:
    """The outcome of `evaluate_checkpoint`: per branch its metrics and the files written (rank 0 only)."""

    branches: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    paths: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    is_main: bool = True


def evaluate_checkpoint(ckpt: Path, data: Path | None, overrides: list[str], device: str, use_ema: bool,
                        requested: list[str], out: Path | None) -> BranchEvaluation:
    """Load a checkpoint (its auxiliary heads too when a branch needs them), evaluate the requested branches on
    the validation split in one pass, and write each branch's metrics / detections files into `out`
    (default: beside the checkpoint)."""
    from codetr.config import apply_overrides
    from codetr.data.loaders import build_dataset, build_eval_loader
    from codetr.engine.distributed import init_distributed
    from codetr.engine.evaluate import evaluate_branches, write_eval_outputs
    from codetr.engine.inference import load_detector
    from codetr.io import check_writable_dir

    info = init_distributed(device)
    detector = load_detector(ckpt, info.device, use_ema=use_ema, deploy=not needs_aux(requested))
    check_writable_dir(out if out is not None else Path(ckpt).parent, "--out")  # before, not after, the evaluation
    branches = resolve_branches(detector.model, requested)
    extra = [f"data.root={data}"] if data is not None else []
    data_cfg = apply_overrides(detector.cfg, extra + list(overrides)).data
    dataset = build_dataset(data_cfg, "val")
    if dataset.cat_ids != detector.cat_ids:
        raise DataError(f"{dataset.ann_file}: categories {dataset.cat_ids} differ from the checkpoint's {detector.cat_ids}")
    loader = build_eval_loader(dataset, data_cfg, info.rank, info.world_size)
    postprocessors = {branch: branch_postprocess(detector.model, branch) for branch in branches}
    outcome = evaluate_branches(detector.model, loader, dataset.coco, dataset.cat_ids, info.device, postprocessors,
                                progress=info.is_main)
    result = BranchEvaluation(branches, is_main=info.is_main)
    if not info.is_main:
        return result
    out_dir = out if out is not None else ckpt.parent
    for branch in branches:
        metrics, detections = outcome[branch]
        extra_fields = {"checkpoint": str(ckpt), "epoch": detector.epoch, "ann_file": str(dataset.ann_file)}
        if branch != DETR:
            extra_fields.update(branch=branch, postprocess=postprocess_settings(detector.model, branch))
        result.metrics[branch] = metrics
        result.paths[branch] = write_eval_outputs(out_dir, metrics, detections, extra=extra_fields,
                                                  suffix=file_suffix(branch))
    return result


def branch_table(metrics: dict[str, dict[str, float]]) -> Table:
    """One row per branch: AP, AP50, AP75, APs, APm, APl, AR100 (COCOeval's fractions, 3 decimals)."""
    table = Table(title="COCO box metrics per branch")
    table.add_column("branch", justify="left", no_wrap=True)
    for name in TABLE_METRICS:
        table.add_column(name, justify="right")
    for branch, values in metrics.items():
        table.add_row(branch, *(f"{values[name]:.3f}" for name in TABLE_METRICS))
    return table
