"""Grad-CAM of every Co-DETR head on the DETR encoder output (the input of the paper's Figures 1-2).

The encoder output ("memory", [B, S, C] tokens) is what the one-to-one decoder, the auxiliary heads and
the positive-query branches all read, so a head's Grad-CAM on it shows which encoder features that head
pushes on. For head h with scalar target y_h, on encoder level l (map A^l = memory cut back to
[C, H_l, W_l], strides 8, 16, 32, 64):

    alpha_c = mean_{x, y} d y_h / d A^l_c(x, y)          CAM_l = ReLU(sum_c alpha_c A^l_c)      [H_l, W_l]

The levels are brought to one grid (bilinear resize to the finest level, then averaged) and divided by
their sum: a probability distribution over encoder locations, which codetr's conflict analysis compares
between heads with a KL divergence (analysis/conflicts.py).

Heads (`head_names`): "detr" (the one-to-one head), then every auxiliary head of `model.aux.heads` under
its log name ("atss", "faster_rcnn", "atss_2", ...), and optionally "posq.<head>" (that head's
positive-query branch through the shared decoder).

How it runs (one image at a time, so there is no padding): the model stays in eval mode (dropout off),
the one-to-one detector runs as usual and the training-only branches are called explicitly with the
ground truth (`model.aux(...)`), so every head's loss exists in one forward pass. Their random parts
(RPN / RoI sampling, positive-query sub-sampling) draw from torch's global generator, which is seeded per
image inside a forked RNG state: the CAMs are deterministic and the caller's RNG is untouched. Gradients
are taken with respect to the memory only: a forward hook makes the last encoder layer's output a leaf,
and parameters are frozen meanwhile, so nothing before the encoder output is differentiated.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.data.collate import Batch
from codetr.errors import ConfigError
from codetr.models.co_detr.aux_features import memory_to_maps
from codetr.models.co_detr.heads.faster_rcnn import FasterRCNNHead
from codetr.models.co_detr.heads.roi_head import multilevel_roi_align
from codetr.models.co_detr.types import AuxInputs
from codetr.models.criterion import SetCriterion
from codetr.models.detector import DeformableDETR, DetectorOutput
from codetr.models.loss_terms import ONE_TO_ONE_GROUPS, TermName, is_loss_term, parse_term

DETR_HEAD = "detr"
POSQ_PREFIX = "posq."

TARGETS = ("loss", "score")
DETR_TERMS = ("all", "decoder", "last")
RESIZE_MODES = ("bilinear", "nearest")
LEVEL_WEIGHTINGS = ("raw", "normalized")
LOSS_WEIGHTINGS = ("training", "raw")


@dataclass(frozen=True)
class CamOptions:
    """Every choice the paper leaves open about the per-head CAM (defaults in brackets).

    target ["loss"]: the scalar back-propagated per head.
        "loss": the head's own training loss against the ground truth: detr = `dec.*` (+ `enc.*`, see
        detr_terms), <head> = `aux.<head>.*`, posq.<head> = `posq.<head>.*` (every decoder layer), its
        terms weighted as in training (see loss_weighting).
        "score": the sum of the head's `score_topk` highest classification scores, no ground truth in the
        score itself: detr and posq.<head>: sigmoid scores of the (query, class) pairs of the last decoder
        layer (what the detector ranks its detections by); one-stage heads (ATSS, FCOS, RetinaNet, GFL,
        PAA): sigmoid scores of the (anchor, class) pairs over all five levels; Faster-RCNN: the RoI
        head's softmax foreground scores of the (RPN proposal, class) pairs (background excluded). The
        posq branches' queries still come from each head's ground-truth assignment.
    loss_weighting ["training"]: how a head's loss terms are summed in loss mode. "training": each term
        times its training weight inside the head (DETR: cls 2, L1 5, GIoU 2; an auxiliary head its own
        weights). lambda1 / lambda2 scale a whole head, which the normalisation to a distribution
        cancels, so they are left out (a lambda of 0 still gives that head a CAM). "raw": unweighted sum.
    detr_terms ["all"]: the one-to-one loss terms summed for "detr" in loss mode: "all" = every decoder
        layer + the encoder proposals (the whole one-to-one loss), "decoder" = decoder layers only,
        "last" = the last decoder layer only.
    include_posq [False]: also a CAM for each head's positive-query branch (`posq.<head>`).
    score_topk [100]: k of the score target (capped at the number of pairs).
    levels [None = all]: the encoder levels (0 = the finest: stride 8, or 4 with 5 levels) whose CAMs are combined.
    grid_level [0]: the level whose grid the CAMs are resized to (0 = finest: stride 8, or 4 with 5 levels).
    resize_mode ["bilinear"]: how CAMs are resized to that grid ("bilinear", align_corners=False, keeps
        them non-negative; or "nearest").
    level_weighting ["raw"]: "raw" averages the resized CAMs as they are (a level with larger
        activations x gradients weighs more); "normalized" divides each resized CAM by its sum before
        averaging, so every level carries the same mass on the common grid.
    An all-zero combined CAM (every location clipped by the ReLU) becomes the uniform distribution; such
    heads are reported as degenerate.
    """

    target: str = "loss"
    loss_weighting: str = "training"
    detr_terms: str = "all"
    include_posq: bool = False
    score_topk: int = 100
    levels: tuple[int, ...] | None = None
    grid_level: int = 0
    resize_mode: str = "bilinear"
    level_weighting: str = "raw"

    def __post_init__(self) -> None:
        for name, allowed in (("target", TARGETS), ("detr_terms", DETR_TERMS), ("resize_mode", RESIZE_MODES),
                              ("level_weighting", LEVEL_WEIGHTINGS),
                              ("loss_weighting", LOSS_WEIGHTINGS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"CamOptions.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.score_topk < 1:
            raise ConfigError(f"CamOptions.score_topk must be >= 1, got {self.score_topk}")
        if self.levels is not None and (len(self.levels) == 0 or min(self.levels) < 0):
            raise ConfigError(f"CamOptions.levels must be non-empty level indices >= 0, got {self.levels}")
        if self.grid_level < 0:
            raise ConfigError(f"CamOptions.grid_level must be >= 0, got {self.grid_level}")


def grad_cam(activation: Tensor, gradient: Tensor) -> Tensor:
    """Grad-CAM of one map: activation, gradient [C, H, W] -> ReLU(sum_c alpha_c A_c) [H, W], with
    alpha_c = the spatial mean of the gradient of channel c."""
    alpha = gradient.mean(dim=(1, 2))  # [C]
    return torch.einsum("c,chw->hw", alpha, activation).clamp(min=0)


def merge_levels(level_cams: list[Tensor], options: CamOptions) -> Tensor:
    """Per-level CAMs [H_l, W_l] -> one map on level `grid_level`'s grid [H_g, W_g] (not normalised)."""
    levels = options.levels if options.levels is not None else tuple(range(len(level_cams)))
    if max(levels) >= len(level_cams) or options.grid_level >= len(level_cams):
        raise ConfigError(
            f"CamOptions: levels {levels} / grid_level {options.grid_level} out of range for "
            f"{len(level_cams)} encoder levels"
        )
    grid = tuple(level_cams[options.grid_level].shape)
    resized = []
    for level in levels:
        cam = level_cams[level]
        if tuple(cam.shape) != grid:
            align = {"align_corners": False} if options.resize_mode == "bilinear" else {}
            cam = F.interpolate(cam[None, None], size=grid, mode=options.resize_mode, **align)[0, 0]
        if options.level_weighting == "normalized":  # after resizing: upsampling multiplies a level's mass
            cam = cam / cam.sum().clamp(min=torch.finfo(cam.dtype).tiny)
        resized.append(cam)
    return torch.stack(resized).mean(0)


def to_distribution(cam: Tensor) -> tuple[Tensor, bool]:
    """A non-negative map -> (map / its sum, False); an all-zero map -> (uniform, True)."""
    total = cam.sum()
    if total <= 0:
        return torch.full_like(cam, 1.0 / cam.numel()), True
    return cam / total, False


def head_names(model: nn.Module, include_posq: bool = False) -> list[str]:
    """["detr", <aux heads>..., ("posq.<head>"...)] in this order (the paper's: DETR first)."""
    aux = getattr(model, "aux", None)
    names = list(aux.names) if aux is not None else []
    return [DETR_HEAD, *names, *([POSQ_PREFIX + n for n in names] if include_posq else [])]


@dataclass
class ImageCams:
    """Every head's CAM for one image.

    level_cams[head]: per encoder level [H_l, W_l] (Grad-CAM before resizing); distributions[head]:
    [H_g, W_g] on level `grid_level`'s grid, non-negative, summing to 1; targets[head]: the scalar that
    was back-propagated; degenerate: heads whose CAM was all zero (uniform distribution used).
    `grid_stride` is the grid's stride in input pixels (8 for the finest level).
    """

    heads: list[str]
    level_cams: dict[str, list[Tensor]]
    distributions: dict[str, Tensor]
    targets: dict[str, float]
    degenerate: list[str] = field(default_factory=list)
    grid_stride: int = 8


class EncoderOutputCam(AbstractContextManager):
    """Computes ImageCams for one image at a time; a context manager around a Co-DETR model.

    On entry: eval mode, parameters frozen, a forward hook on the last encoder layer (whose output is
    `DetectorOutput.memory`) and pre-hooks on the auxiliary heads (to read their `AuxInputs` for the
    score target). On exit all of it is undone.

        with EncoderOutputCam(model, criterion, CamOptions()) as cams:
            image_cams = cams(batch, seed=0)       # batch: one image, targets as the dataset gives them
    """

    def __init__(self, model: DeformableDETR, criterion: SetCriterion, options: CamOptions = CamOptions()) -> None:
        if not getattr(model, "aux", None) or len(model.aux.heads) == 0:
            raise ConfigError("the model has no auxiliary heads (model.aux.heads is empty): head conflicts need "
                              "a Co-DETR model loaded with deploy=False")
        self.model = model
        self.criterion = criterion
        self.options = options
        self.heads = head_names(model, options.include_posq)
        self._memory: Tensor | None = None
        self._aux_inputs: dict[int, AuxInputs] = {}
        self._hooks: list[Any] = []
        self._saved_state: tuple[bool, list[bool]] | None = None

    def __enter__(self) -> EncoderOutputCam:
        params = list(self.model.parameters())
        self._saved_state = (self.model.training, [p.requires_grad for p in params])
        self.model.eval()
        for p in params:
            p.requires_grad_(False)  # only d(target)/d(memory) is needed: no graph before the memory
        self._hooks.append(self.model.transformer.encoder_layers[-1].register_forward_hook(self._capture_memory))
        for index, head in enumerate(self.model.aux.heads):
            self._hooks.append(head.register_forward_pre_hook(self._input_capture(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._saved_state is not None:
            training, flags = self._saved_state
            for p, flag in zip(self.model.parameters(), flags):
                p.requires_grad_(flag)
            self.model.train(training)
            self._saved_state = None

    def _capture_memory(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        # The returned leaf replaces the layer's output, so every consumer of the memory reads it.
        self._memory = output.detach().requires_grad_(True)
        return self._memory

    def _input_capture(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._aux_inputs[index] = args[0]
        return hook

    def forward(self, batch: Batch) -> DetectorOutput:
        """The detector's outputs with `aux` filled in (all branches, with the batch's ground truth)."""
        self._memory, self._aux_inputs = None, {}
        outputs = self.model(batch.images, batch.masks)
        if self._memory is None or outputs.memory is not self._memory:
            raise RuntimeError("the hook on the last encoder layer did not capture DetectorOutput.memory")
        outputs.aux = self.model.aux(outputs, batch.masks, batch.targets, self.model.transformer.decoder)
        return outputs

    def __call__(self, batch: Batch, seed: int = 0) -> ImageCams:
        """batch: ONE image (images [1, 3, H, W], masks [1, H, W], targets with "boxes" cxcywh normalised
        and "labels"), on any device (moved to the model's). `seed` seeds the branches' sampling."""
        if self._saved_state is None:
            raise RuntimeError("use EncoderOutputCam as a context manager (with ... as cams)")
        if len(batch) != 1:
            raise ValueError(f"EncoderOutputCam takes one image at a time, got a batch of {len(batch)}")
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        cuda_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices), torch.enable_grad():
            torch.manual_seed(seed)
            outputs = self.forward(batch)
            targets = self.targets(outputs, batch)
            memory = self._memory
            gradients = {
                head: torch.autograd.grad(value, memory, retain_graph=True, allow_unused=True)[0]
                for head, value in targets.items()
            }
        return self._cams(memory.detach(), gradients, targets, outputs)

    def targets(self, outputs: DetectorOutput, batch: Batch) -> dict[str, Tensor]:
        """The scalar per head (see CamOptions.target), in `self.heads` order."""
        if self.options.target == "loss":
            losses = self.criterion(outputs, batch.targets)
            return {head: self._loss_sum(head, losses) for head in self.heads}
        return {head: self._score(head, outputs) for head in self.heads}

    def _loss_sum(self, head: str, losses: dict[str, Tensor]) -> Tensor:
        weight = self.criterion.weights.term_weight if self.options.loss_weighting == "training" else (lambda _: 1.0)
        terms = [value.float() * weight(name) for name, value in losses.items()
                 if is_loss_term(name) and self._is_term_of(head, parse_term(name))]
        if not terms:
            raise RuntimeError(f"no loss terms for head {head!r}")
        return torch.stack(terms).sum()

    def _is_term_of(self, head: str, term: TermName) -> bool:
        """Whether a loss term belongs to `head`'s loss (see CamOptions.detr_terms for "detr")."""
        if head == DETR_HEAD:
            last = len(self.model.transformer.decoder.layers) - 1
            return {"all": term.group in ONE_TO_ONE_GROUPS, "decoder": term.group == "dec",
                    "last": term.group == "dec" and term.layer == last}[self.options.detr_terms]
        if head.startswith(POSQ_PREFIX):
            return term.group == "posq" and term.head == head.removeprefix(POSQ_PREFIX)
        return term.group == "aux" and term.head == head

    def _score(self, head: str, outputs: DetectorOutput) -> Tensor:
        k = self.options.score_topk
        if head == DETR_HEAD:
            return top_scores(outputs.pred_logits.sigmoid(), k)
        names = list(self.model.aux.names)
        if head.startswith(POSQ_PREFIX):
            branch = outputs.aux[names.index(head.removeprefix(POSQ_PREFIX))]
            return top_scores(branch.posq.decoded.logits[-1].sigmoid(), k)
        index = names.index(head)
        module, inputs = self.model.aux.heads[index], self._aux_inputs[index]
        if isinstance(module, FasterRCNNHead):
            return top_scores(faster_rcnn_foreground_scores(module, inputs), k)
        if not hasattr(module, "predict"):
            raise ConfigError(f"score target: no classification scores defined for auxiliary head {head!r}")
        return top_scores(module.predict(inputs.maps)[0].sigmoid(), k)  # one-stage: class logits [B, M, K]

    def _cams(self, memory: Tensor, gradients: dict[str, Tensor | None], targets: dict[str, Tensor],
              outputs: DetectorOutput) -> ImageCams:
        maps, _ = memory_to_maps(memory, outputs.feats)  # L x [1, C, H_l, W_l]
        result = ImageCams(self.heads, {}, {}, {}, grid_stride=outputs.feats.strides[self.options.grid_level])
        for head in self.heads:
            gradient = gradients[head]
            grad_maps, _ = memory_to_maps(gradient if gradient is not None else torch.zeros_like(memory), outputs.feats)
            level_cams = [grad_cam(a[0].float(), g[0].float()) for a, g in zip(maps, grad_maps)]
            distribution, degenerate = to_distribution(merge_levels(level_cams, self.options))
            result.level_cams[head] = level_cams
            result.distributions[head] = distribution
            result.targets[head] = float(targets[head].detach())
            if degenerate:
                result.degenerate.append(head)
        return result


def top_scores(scores: Tensor, k: int) -> Tensor:
    """Sum of the k highest entries of `scores` (any shape; k capped at its size): a scalar."""
    flat = scores.float().flatten()
    return flat.topk(min(k, flat.numel())).values.sum()


def faster_rcnn_foreground_scores(head: FasterRCNNHead, inputs: AuxInputs) -> Tensor:
    """The RoI head's softmax class scores [P, num_classes] (background dropped) on the RPN proposals of
    every image of `inputs`; the proposals are detached as in training, the RoI features are not."""
    rpn_out = head.rpn(inputs.maps, inputs.image_sizes, inputs.gt_boxes)
    roi_head = head.roi_head
    boxes = torch.cat(rpn_out.proposals).float()
    image_index = torch.cat([torch.full((len(p),), i, device=boxes.device) for i, p in enumerate(rpn_out.proposals)])
    rois = torch.cat((image_index[:, None].to(boxes.dtype), boxes), 1)  # [P, 5] (image, x1, y1, x2, y2)
    roi_feats = multilevel_roi_align(inputs.maps[: len(roi_head.strides)], rois, roi_head.strides,
                                     roi_head.roi_size, roi_head.finest_scale)
    cls_logits, _ = roi_head.bbox_head(roi_feats)
    return cls_logits.float().softmax(-1)[:, : roi_head.num_classes]  # background is the last class
