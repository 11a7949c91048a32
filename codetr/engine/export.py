"""`codetr export`: the deployed detector as an ONNX graph or a torch.export program, and weights-only checkpoints.

The graph (both formats) is the deployed one-to-one detector of `codetr eval` / `predict` (no auxiliary heads,
EMA weights when the checkpoint has them) with the pure-PyTorch deformable attention ("grid_sample"; the sparse
CSR implementation does not export) and the top-k post-processing. Its contract:

  inputs   images      float32 [B, 3, H, W]  RGB / 255, minus ImageNet mean, over std (`data.transforms.Normalize`),
                                             each image at the top-left, zeros in the padding
           masks       bool    [B, H, W]     True = padding
           orig_sizes  float32 [B, 2]        (h, w) the boxes are scaled to: the original image's size (with LSJ
                                             the extent the padded square covers, target["box_extent"]), or the
                                             unpadded input's size for boxes in input pixels
  outputs  scores      float32 [B, K]        sigmoid class scores, descending (K = min(model.num_detections, Q * C))
           labels      int64   [B, K]        class index 0..C-1 (metadata "class_names" / "cat_ids" name them)
           boxes       float32 [B, K, 4]     xyxy in orig_sizes pixels, clipped to them
           logits      float32 [B, Q, C]     the last decoder layer's raw logits, every query
           pred_boxes  float32 [B, Q, 4]     its boxes, cxcywh normalised to each image's unpadded region

B, H and W are dynamic (H, W >= the largest feature stride + 1, e.g. 65 px); scores / labels / boxes are
`model.postprocess`'s, before Co-DINO's soft-NMS (a data-dependent loop, not in the graph: `model.test_nms` in the
metadata says when to apply it). The inputs are what the evaluation feeds the model: resize with the test resize
(`data.test_size` / `data.test_max_size`, or LSJ's), normalise, pad; the metadata holds those settings.

Tracing needs every size the model computes with as a Python (or symbolic) int: the deformable attention and the
encoder's reference points take the level sizes from `FlatFeatures.level_shapes`, since reading the values of the
`spatial_shapes` tensor is data-dependent for torch.export. torch.onnx.export(dynamo=False) (TorchScript) also
gives a correct graph, but with H and W fixed at the traced size; it is deprecated and not offered.

Weights-only checkpoints keep what every `--ckpt` command loads (one set of model weights, the EMA ones by
default, with config, num_classes, cat_ids, class_names, position) and drop the optimizer, scheduler, raw or EMA
copy and RNG states, so `codetr train --resume` refuses them.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import PIL.Image
import torch
from torch import Tensor, nn

from codetr.data.collate import collate
from codetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, make_lsj_transforms, make_test_transforms
from codetr.engine.inference import LoadedDetector
from codetr.errors import CheckpointError, ConfigError
from codetr.io import atomic_write_bytes
from codetr.models.detector import top_detections
from codetr.models.ms_deform_attn import use_attention_impl

FORMATS = ("onnx", "torch-export", "weights")
SUFFIX_FORMATS = {".onnx": "onnx", ".pt2": "torch-export"}
INPUT_NAMES = ("images", "masks", "orig_sizes")
OUTPUT_NAMES = ("scores", "labels", "boxes", "logits", "pred_boxes")
ONNX_OPSET = 18  # GridSample needs >= 16; 18 is the opset torch's ONNX exporter translates to natively
METADATA_FILE = "codetr.json"  # inside a .pt2 (torch.export.save's extra_files)
WEIGHTS_ONLY_KEY = "weights_only"  # marks a weights-only checkpoint: {"weights": "ema" | "raw", "source": path}


def resolve_format(out: Path, fmt: str | None, weights_only: bool) -> str:
    """The export format: --format, --weights-only, or read off --out's suffix (.onnx, .pt2)."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if weights_only:
        if fmt not in (None, "weights"):
            raise ConfigError(f"--weights-only writes a checkpoint: it does not go with --format {fmt}")
        return "weights"
    if fmt is not None:
        return fmt
    if out.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[out.suffix.lower()]
    raise ConfigError(f"--out {out}: give --format onnx|torch-export, --weights-only, or a name ending in .onnx / .pt2")


class DeployedGraph(nn.Module):
    """The exported function: the one-to-one detector plus `top_detections` (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_detections = model.num_detections

    def forward(self, images: Tensor, masks: Tensor, orig_sizes: Tensor) -> tuple[Tensor, ...]:
        """images [B, 3, H, W] normalised, masks [B, H, W] True = padding, orig_sizes [B, 2] (h, w) -> scores [B, K],
        labels [B, K], boxes [B, K, 4] xyxy pixels, logits [B, Q, C], pred_boxes [B, Q, 4] cxcywh normalised."""
        outputs = self.model(images, masks)
        logits, pred_boxes = outputs.pred_logits.float(), outputs.pred_boxes.float()
        scores, labels, boxes = top_detections(logits, pred_boxes, orig_sizes, self.num_detections)
        return scores, labels, boxes, logits, pred_boxes


@dataclass
class GraphInputs:
    images: Tensor  # [B, 3, H, W] float32, normalised, zero padding
    masks: Tensor  # [B, H, W] bool, True = padding
    orig_sizes: Tensor  # [B, 2] float32 (h, w)

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.images, self.masks, self.orig_sizes


def graph_inputs(detector: LoadedDetector, pictures: list[PIL.Image.Image]) -> GraphInputs:
    """The evaluation's preprocessing of PIL images (test resize or LSJ, normalise, pad into one batch)."""
    data = detector.cfg.data
    transforms = (make_lsj_transforms(False, data.lsj_size) if data.lsj
                  else make_test_transforms(data.test_size, data.test_max_size))
    samples = []
    for picture in pictures:
        width, height = picture.size
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 0,
                  "orig_size": torch.tensor([height, width]), "size": torch.tensor([height, width])}
        samples.append(transforms(picture, target))
    batch = collate(samples)
    sizes = torch.stack([torch.as_tensor(t.get("box_extent", t["orig_size"])) for t in batch.targets]).float()
    return GraphInputs(batch.images, batch.masks, sizes)


def example_inputs(detector: LoadedDetector) -> GraphInputs:
    """Two images of the configured test size, the second padded, H != W: traced with dynamic B, H, W (no size
    1 and no two equal sizes, which the tracer would specialise on)."""
    data = detector.cfg.data
    height = data.lsj_size if data.lsj else data.test_size
    width = height + 32
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, height, width, generator=generator)
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[1, height - 16:] = True
    masks[1, :, width - 24:] = True
    images[masks[:, None].expand_as(images)] = 0.0
    sizes = torch.tensor([[height, width], [height - 16, width - 24]], dtype=torch.float32)
    return GraphInputs(images, masks, sizes)


def dynamic_shapes(model: nn.Module) -> dict[str, dict[int, Any]]:
    """B, H, W dynamic. The smallest level (the largest stride) must be at least 2 x 2: at 1 x 1 the traced
    layout no longer holds, so H, W >= largest stride + 1."""
    from torch.export import Dim

    smallest = max(model.level_strides) + 1
    batch, height, width = Dim("batch", min=1), Dim("height", min=smallest), Dim("width", min=smallest)
    return {"images": {0: batch, 2: height, 3: width}, "masks": {0: batch, 1: height, 2: width},
            "orig_sizes": {0: batch}}


def prepare(detector: LoadedDetector) -> DeployedGraph:
    """The graph module on the CPU in float32, eval mode, with the grid_sample attention forced."""
    # a copy: the detector itself keeps its own attention setting (its eager outputs are the reference)
    model = use_attention_impl(copy.deepcopy(detector.model).float().cpu().eval(), "grid_sample")
    return DeployedGraph(model).eval()


def export_program(detector: LoadedDetector) -> torch.export.ExportedProgram:
    """torch.export of the deployed graph, dynamic in B, H and W."""
    graph = prepare(detector)
    with torch.no_grad():
        return torch.export.export(graph, example_inputs(detector).as_tuple(), dynamic_shapes=dynamic_shapes(graph.model))


def metadata(detector: LoadedDetector, source: str | Path) -> dict[str, str]:
    """What a user of the exported file needs besides the graph, as strings (ONNX metadata_props)."""
    cfg = detector.cfg
    data = cfg.data
    resize = (f"LSJ: resized to fit {data.lsj_size} x {data.lsj_size}, padded to it with grey (image, not padding: "
              "masks all False; orig_sizes = the original pixels the square covers)" if data.lsj
              else f"shorter side to {data.test_size}, longer side <= {data.test_max_size} (bilinear)")
    return {
        "producer": "codetr export",
        "source_checkpoint": str(source),
        "preset": str(cfg.preset),
        "epoch": str(detector.epoch),
        "class_names": json.dumps(detector.class_names),
        "cat_ids": json.dumps(detector.cat_ids),
        "inputs": ", ".join(INPUT_NAMES),
        "outputs": ", ".join(OUTPUT_NAMES),
        "resize": resize,
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "num_detections": str(detector.model.num_detections),
        "test_nms": f"{cfg.model.test_nms} (iou {cfg.model.test_nms_iou})" if cfg.model.test_nms != "none" else "none",
    }


def export_onnx(detector: LoadedDetector, out: Path, source: str | Path,
                program: torch.export.ExportedProgram | None = None) -> None:
    """Write the graph as one ONNX file (weights inside, opset ONNX_OPSET), via torch.export and torch's exporter;
    `program`: export_program(detector) when already made."""
    _require("onnx", "onnxscript")
    program = program if program is not None else export_program(detector)
    # onnxscript's constant folding warns once per multi-output Split it leaves (the per-level split of the
    # attention values): expected, and not the user's concern
    folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding_log.level
    folding_log.setLevel(logging.ERROR)
    try:  # optimize=True folds the graph's constants (the level sizes, the grids' shapes)
        onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=ONNX_OPSET,
                                         input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), optimize=True,
                                         verbose=False)
    finally:
        folding_log.setLevel(level)
    onnx_program.model.metadata_props.update(metadata(detector, source))
    # one file, weights inside (models up to protobuf's 2 GB; Swin-L Co-DINO is ~0.9 GB), written atomically
    atomic_write_bytes(out, onnx_program.model_proto.SerializeToString())


def export_torch(detector: LoadedDetector, out: Path, source: str | Path,
                 program: torch.export.ExportedProgram | None = None) -> None:
    """Write the torch.export program (.pt2; torch.export.load(out).module() runs it), metadata as codetr.json;
    `program`: export_program(detector) when already made."""
    program = program if program is not None else export_program(detector)
    extra = {METADATA_FILE: json.dumps(metadata(detector, source), indent=1)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the plain model's decoder layers share one class / box branch: torch.export.save finds several equal
        # tensors on one storage, warns that none covers the others, and stores that one storage (correctly)
        warnings.filterwarnings("ignore", message="No complete tensor found")
        torch.export.save(program, buffer, extra_files=extra)
    atomic_write_bytes(out, buffer.getvalue())


def _require(*modules: str, purpose: str = "ONNX export") -> None:
    """ConfigError naming the pip command if an optional package is missing (checked before any work)."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        extra = " (or pip install -e '.[export]')" if purpose == "ONNX export" else ""
        raise ConfigError(f"{purpose} needs {' and '.join(missing)}: pip install {' '.join(missing)}{extra}")


def load_exported(path: Path, fmt: str) -> Callable[[GraphInputs], list[Tensor]]:
    """The exported file as a function of GraphInputs returning its outputs (OUTPUT_NAMES order): an onnxruntime
    CPU session, or the loaded .pt2 program (loading takes seconds: load once, run many)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(inputs: GraphInputs) -> list[Tensor]:
            feeds = dict(zip(INPUT_NAMES, (t.numpy() for t in inputs.as_tuple())))
            return [torch.from_numpy(array) for array in session.run(list(OUTPUT_NAMES), feeds)]

        return run_onnx
    module = torch.export.load(str(path)).module()

    @torch.no_grad()
    def run_program(inputs: GraphInputs) -> list[Tensor]:
        return list(module(*inputs.as_tuple()))

    return run_program


def run_exported(path: Path, fmt: str, inputs: GraphInputs) -> list[Tensor]:
    """The exported file's outputs (OUTPUT_NAMES order) on `inputs` (see load_exported)."""
    return load_exported(path, fmt)(inputs)


@torch.no_grad()
def eager_outputs(detector: LoadedDetector, inputs: GraphInputs) -> list[Tensor]:
    """The same function run by PyTorch itself (OUTPUT_NAMES order), with the checkpoint's own attention setting."""
    return list(DeployedGraph(detector.model.float().cpu().eval())(*inputs.as_tuple()))


def max_differences(exported: list[Tensor], eager: list[Tensor]) -> dict[str, float]:
    """Largest absolute difference per output (labels: how many differ)."""
    return {name: float((a.double() - b.double()).abs().max()) if name != "labels" else float((a != b).sum())
            for name, a, b in zip(OUTPUT_NAMES, exported, eager)}


# -- weights-only checkpoints ------------------------------------------------------------------------------------

def weights_only_state(state: dict[str, Any], use_ema: bool, source: str | Path) -> dict[str, Any]:
    """A checkpoint holding one set of model weights (the EMA ones when present and `use_ema`, else the raw
    ones; training-only modules included, so `eval --branch` and the analyses still work), config, num_classes,
    cat_ids, class_names and position; no optimizer / scheduler / scaler / RNG state."""
    if state.get(WEIGHTS_ONLY_KEY):
        held = state[WEIGHTS_ONLY_KEY]["weights"]
        if not use_ema and held == "ema":
            raise CheckpointError(f"{source} is already weights-only with the EMA weights: --no-ema needs the full checkpoint")
        return dict(state)
    weights, kind = state["model"], "raw"
    if use_ema and state.get("ema"):
        weights = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
        kind = "ema"
    position = state.get("position") or {"epoch": 0, "iteration": 0, "step": 0}
    return {
        "model": {k: v.clone() for k, v in weights.items()},  # clone: no storage shared with the dropped tensors
        "config": state["config"],
        "num_classes": state["num_classes"],
        "cat_ids": list(state["cat_ids"]),
        "class_names": list(state["class_names"]),
        "position": dict(position),
        WEIGHTS_ONLY_KEY: {"weights": kind, "source": str(source)},
    }


def export_weights(ckpt: Path, out: Path, use_ema: bool) -> str:
    """Write the weights-only checkpoint of `ckpt` (a codetr or released file) to `out`; returns "ema" or "raw"."""
    from codetr.convert import load_any_checkpoint
    from codetr.engine.checkpoint import save_checkpoint

    state = weights_only_state(load_any_checkpoint(ckpt), use_ema, ckpt)
    save_checkpoint(out, {k: v for k, v in state.items() if k != "format_version"})
    return state[WEIGHTS_ONLY_KEY]["weights"]


def file_size_mb(path: Path) -> float:
    return os.path.getsize(path) / 1e6


EXPORTERS: dict[str, Callable[[LoadedDetector, Path, str | Path], None]] = {
    "onnx": export_onnx,
    "torch-export": export_torch,
}


def run_export(ckpt: Path, out: Path, fmt: str | None, weights_only: bool, use_ema: bool,
               image: Path | None = None) -> list[str]:
    """`codetr export`: check the arguments before any work, write `out`, optionally compare it with PyTorch on
    `image`. Returns the lines to print."""
    from codetr.engine.inference import load_detector, open_image
    from codetr.io import check_writable_file

    fmt = resolve_format(out, fmt, weights_only)
    if not ckpt.is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt}")
    check_writable_file(out, "--out")
    in_place = out.exists() and out.resolve() == ckpt.resolve()
    if fmt == "weights":  # in place too (a finished run's last.pt): read whole, then replaced atomically
        if image is not None:
            raise ConfigError("--image checks a graph export (onnx, torch-export), not --weights-only")
        before = file_size_mb(ckpt)
        kind = export_weights(ckpt, out, use_ema)
        return [f"{'replaced' if in_place else 'wrote'} {out}: weights-only ({kind} weights), {file_size_mb(out):.1f} MB "
                f"(the checkpoint: {before:.1f} MB); every --ckpt command loads it, train --resume does not"]
    if in_place:
        raise ConfigError(f"--out {out} is the checkpoint itself: write the {fmt} export to another file")
    if fmt == "onnx":
        _require("onnx", "onnxscript")
        if image is not None:
            _require("onnxruntime", purpose="--image with an ONNX export")
    picture = open_image(image) if image is not None else None
    detector = load_detector(ckpt, "cpu", use_ema=use_ema)
    EXPORTERS[fmt](detector, out, ckpt)
    lines = [f"wrote {out}: {fmt}, {file_size_mb(out):.1f} MB; inputs {', '.join(INPUT_NAMES)}, outputs "
             f"{', '.join(OUTPUT_NAMES)} (dynamic batch, height, width; see codetr export --help)"]
    if detector.cfg.model.test_nms != "none":
        lines.append(f"note: the graph stops before the {detector.cfg.model.test_nms}-NMS (model.test_nms) that "
                     "codetr eval applies: run it on scores / labels / boxes")
    if picture is not None:
        inputs = graph_inputs(detector, [picture])
        diff = max_differences(run_exported(out, fmt, inputs), eager_outputs(detector, inputs))
        runner = "onnxruntime" if fmt == "onnx" else "the .pt2 program"
        shape = "x".join(str(n) for n in inputs.images.shape[-2:])
        lines.append(f"checked on {image} ({shape} input), {runner} against PyTorch: largest differences "
                     + ", ".join(f"{name} {value:.2g}" for name, value in diff.items() if name != "labels")
                     + f"; {int(diff['labels'])} labels differ")
    return lines
