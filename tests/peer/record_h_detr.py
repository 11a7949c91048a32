"""Record the official H-Deformable-DETR (HDETR/H-Deformable-DETR) on one batch, with codetr's weights.

Run by hand in codetr's own environment (never by CI, never imported by tests), on an unpacked copy of the
official repository; nothing of it is copied into codetr, it is imported from that path at record time:

    git --git-dir=<mirror of HDETR/H-Deformable-DETR> archive HEAD | tar x -C /tmp/hdetr
    python tests/peer/record_h_detr.py /tmp/hdetr --commit <its commit>

The model is the official "hybrid branch" Deformable-DETR++ config (two-stage, box refine, mixed query
selection, look forward twice, dropout 0), shrunk: ResNet-18, d_model 256 (the official proposal embedding
hard-codes 128 sine features per coordinate), 8 heads, 4 points, FFN 128, 2 encoder / 3 decoder layers,
10 one-to-one + 30 one-to-many queries, k_one2many 3, lambda_one2many 0.5 (not 1, so that the weight is seen);
20 classes (what the official `build` gives any non-COCO dataset). codetr builds the same model from `tiny_pp`
with `model.method=h_detr` and the overrides in CODETR_OVERRIDES.

Running the official code on the CPU, without editing it:
  - its MSDeformAttn calls the compiled CUDA op: a stub `MultiScaleDeformableAttention` module lets the file
    import, and the module's `MSDeformAttnFunction` is replaced by the repository's own pure-PyTorch
    `ms_deform_attn_core_pytorch`;
  - `Backbone` downloads ImageNet weights and refuses ResNet-18 (its channel numbers are hard-coded for 50+):
    the recorder builds the backbone from the official `BackboneBase` + `Joiner` + positional encoding around
    a torchvision ResNet-18 with the official FrozenBatchNorm2d, with ResNet-18's channels (128, 256, 512);
  - `engine.py` imports wandb (only for logging): a stub module stands in; the swin backbone file imports
    mmcv / mmdet: a stub `models.swin_transformer` stands in (the ResNet model never uses it).

Weights. codetr's state dict is filled (every tensor `hashed_uniform(numel, seed) * scale + shift`, the
integer hash of tests/peer/record_deformable_detr.py: bit-identical on every platform and torch version;
a fill rather than the modules' own initialisation, which zeroes the box deltas and the attention logits and
would leave those paths untested) and copied into the official model through OFFICIAL_TO_CODETR. The official
input projections' conv biases (codetr's ChannelMapper has none) are zero.

Writes tests/fixtures/peer/h_detr.pt (torch.save of tensors, dicts, lists, strings):
  - "source": the repository and commit; "config": codetr's preset and overrides; "settings": the official
    arguments that differ from its defaults;
  - "weights": [{key, shape, seed, scale, shift, sum}] over codetr's state dict, in its order;
  - "inputs": images [B, 3, H, W] (the padded batch, padding 0), masks [B, H, W] (True = padding), targets
    per image {labels [N], boxes [N, 4] cxcywh normalised to the image's valid region};
  - "memory" [B, S, C] (the encoder output), "enc_logits" [B, S, K], "enc_boxes" [B, S, 4] (the two-stage
    proposals of every token, as `out["enc_outputs"]`), "topk_margin" (smallest gap between consecutive
    class-0 scores among the Q + M + 1 best of each image: how far the selection is from a tie);
  - "one2one" / "one2many": {"logits" [L, B, Q or M, K], "boxes" [L, B, Q or M, 4] cxcywh}, every decoder
    layer in training mode; "eval": the same for the one-to-one queries in eval mode, run as the official
    `evaluate` runs it (num_queries and two_stage_num_proposals set to the one-to-one count);
  - "matches": {"one2one", "one2many", "enc"}: per decoder layer (enc: one entry) and image, the official
    matcher's (query index [n], ground-truth index [n] modulo the image's number of boxes: the one-to-many
    targets are k copies, and which copy a query gets is arbitrary);
  - "losses": the official loss dict as `engine.train_hybrid` returns it (raw one-to-one terms, one-to-many
    terms already multiplied by lambda_one2many), "weight_dict": the official criterion's weight dict, "total":
    the weighted sum `train_one_epoch` back-propagates, "gradients": its gradient on the parameters of
    GRADIENT_KEYS, under their codetr keys.

The recorder checks its own key map: every official key has a codetr source of the same shape (or is one of
the zero biases) and every codetr key is used.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import types
from pathlib import Path

import torch
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from codetr.config import apply_overrides, get_preset  # noqa: E402
from codetr.models.detector import build_detector  # noqa: E402
from tests.test_peer_deformable_detr import hashed_uniform  # noqa: E402

OUT = REPO_ROOT / "tests" / "fixtures" / "peer" / "h_detr.pt"
NUM_CLASSES = 20  # the official build(): 20 for any dataset_file but coco / coco_panoptic
Q, M, K_ONE2MANY, LAMBDA_ONE2MANY = 10, 30, 3, 0.5
ENCODER_LAYERS, DECODER_LAYERS, D_MODEL, FFN_DIM = 2, 3, 256, 128
PRESET = "tiny_pp"
CODETR_OVERRIDES = [
    "model.method=h_detr", f"model.num_classes={NUM_CLASSES}", f"model.num_queries={Q}",
    f"model.hybrid.num_queries={M}", f"model.hybrid.repeats={K_ONE2MANY}", f"model.hybrid.weight={LAMBDA_ONE2MANY}",
    f"model.transformer.d_model={D_MODEL}", "model.transformer.num_heads=8", "model.transformer.num_points=4",
    f"model.transformer.ffn_dim={FFN_DIM}", f"model.transformer.num_encoder_layers={ENCODER_LAYERS}",
    f"model.transformer.num_decoder_layers={DECODER_LAYERS}", "model.transformer.dropout=0.0",
    "model.backbone.frozen_stages=1",
]
# The official command line: configs/two_stage/deformable-detr-hybrid-branch/12eps/r50_hybrid_branch_lambda0.5_*
OFFICIAL_ARGS = [
    "--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice", "--dropout", "0.0",
    "--num_queries_one2one", str(Q), "--num_queries_one2many", str(M), "--k_one2many", str(K_ONE2MANY),
    "--lambda_one2many", str(LAMBDA_ONE2MANY), "--hidden_dim", str(D_MODEL), "--dim_feedforward", str(FFN_DIM),
    "--enc_layers", str(ENCODER_LAYERS), "--dec_layers", str(DECODER_LAYERS), "--backbone", "resnet18",
    "--dataset_file", "synthetic", "--device", "cpu",
]
BATCH_HW = (80, 96)
IMG_SHAPES = [(64, 96), (80, 72)]  # valid (h, w) of each image inside the padded batch
GT_BOXES_XYXY = [  # pixels of each image
    [[4.0, 6.0, 40.0, 50.0], [30.0, 20.0, 90.0, 60.0], [60.0, 34.0, 72.0, 46.0]],
    [[10.0, 8.0, 60.0, 44.0], [2.0, 40.0, 30.0, 78.0]],
]
GT_LABELS = [[1, 14, 0], [19, 1]]

# Official state-dict key (regex) -> codetr key (replacement); the first pattern that matches wins.
OFFICIAL_TO_CODETR: list[tuple[str, str]] = [
    (r"^backbone\.0\.body\.conv1\.", "backbone.stem.0."),
    (r"^backbone\.0\.body\.bn1\.", "backbone.stem.1."),
    (r"^backbone\.0\.body\.layer(\d)\.", lambda m: f"backbone.stages.{int(m.group(1)) - 1}."),
    (r"^input_proj\.([0-2])\.", r"neck.lateral.\1."),
    (r"^input_proj\.3\.", "neck.extra."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear1\.", r"transformer.encoder_layers.\1.ffn.0."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear2\.", r"transformer.encoder_layers.\1.ffn.2."),
    (r"^transformer\.encoder\.layers\.", "transformer.encoder_layers."),
    # the official decoder layer names its norms by position in the file: norm2 follows self-attention, norm1
    # cross-attention; codetr numbers them in the order they run
    (r"^(transformer\.decoder\.layers\.\d+)\.norm2\.", r"\1.norm1."),
    (r"^(transformer\.decoder\.layers\.\d+)\.norm1\.", r"\1.norm2."),
    (r"^(transformer\.decoder\.layers\.\d+)\.linear1\.", r"\1.ffn.0."),
    (r"^(transformer\.decoder\.layers\.\d+)\.linear2\.", r"\1.ffn.2."),
    # class_embed / bbox_embed (also listed under transformer.decoder.*): one per decoder layer, the last one
    # (index L) scores the encoder's proposals
    (rf"^(?:transformer\.decoder\.)?class_embed\.{DECODER_LAYERS}\.", "transformer.enc_class_branch."),
    (r"^(?:transformer\.decoder\.)?class_embed\.(\d+)\.", r"transformer.decoder.class_branches.\1."),
    (rf"^(?:transformer\.decoder\.)?bbox_embed\.{DECODER_LAYERS}\.layers\.(\d)\.",
     lambda m: f"transformer.enc_box_branch.{2 * int(m.group(1))}."),
    (r"^(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.layers\.(\d)\.",
     lambda m: f"transformer.decoder.box_branches.{m.group(1)}.{2 * int(m.group(2))}."),
    # mixed selection: the learned rows are the content queries (tgt), the first Q one-to-one (codetr keeps the
    # one-to-many rows apart, in extra_queries: see SPLIT_ROWS)
    (r"^query_embed\.weight$", "transformer.content_queries.weight"),
    (r"^transformer\.", "transformer."),  # level_embed, enc_output(_norm), pos_trans(_norm), decoder layers' rest
]
# Official parameters whose gradient of the weighted total loss is recorded (under their codetr keys): where the
# detaches, look forward twice and the separated query blocks decide which loss reaches what.
GRADIENT_KEYS = [
    "query_embed.weight",  # rows < Q: the one-to-one losses only; rows >= Q: the one-to-many ones
    "transformer.level_embed",
    "transformer.pos_trans.bias",
    "transformer.enc_output.bias",
    *[f"bbox_embed.{l}.layers.2.weight" for l in range(DECODER_LAYERS + 1)],  # the last: encoder loss only
    *[f"class_embed.{l}.bias" for l in range(DECODER_LAYERS + 1)],
    "transformer.decoder.layers.0.cross_attn.sampling_offsets.bias",
    "input_proj.3.1.weight",
]
# Official tensors that are codetr's one-to-one rows and its training-only rows, concatenated along dim 0.
SPLIT_ROWS = {"query_embed.weight": ("transformer.content_queries.weight", "transformer.extra_queries.weight")}
ZERO_IN_OFFICIAL = re.compile(r"^input_proj\.\d\.0\.bias$")  # codetr's ChannelMapper convs have no bias


def codetr_key(official_key: str) -> str | None:
    """The codetr key an official key takes its value from; None for the zero conv biases."""
    if ZERO_IN_OFFICIAL.match(official_key):
        return None
    for pattern, replacement in OFFICIAL_TO_CODETR:
        if re.match(pattern, official_key):
            return re.sub(pattern, replacement, official_key, count=1)
    raise KeyError(f"no codetr counterpart for the official key {official_key!r}")


def fill_rule(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(scale, shift) of one codetr tensor: value = hashed_uniform * scale + shift (activations stay O(1),
    sampling offsets span a few pixels, class scores start near sigmoid(-2))."""
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    uniform_std = 3**0.5  # uniform(-1, 1) * sqrt(3) has std 1
    if key.endswith("running_var"):
        return 0.5, 1.0
    if key.endswith("running_mean"):
        return 0.1, 0.0
    if "sampling_offsets" in key:
        return (2.0 * uniform_std / fan_in**0.5, 0.0) if key.endswith("weight") else (3.0, 0.0)
    if "class_branch" in key and key.endswith("bias"):
        return 0.5, -2.0
    if key in ("transformer.level_embed", "transformer.content_queries.weight", "transformer.extra_queries.weight"):
        return uniform_std, 0.0
    if len(shape) == 4:  # convolutions: He scaling
        return 6**0.5 / fan_in**0.5, 0.0
    if len(shape) == 2:  # linear layers, attention in_proj
        return uniform_std / fan_in**0.5, 0.0
    if key.endswith("weight"):  # FrozenBatchNorm, GroupNorm, LayerNorm scales
        return 0.2, 1.0
    return 0.1, 0.0  # biases


def filled_codetr_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], list[dict]]:
    """(codetr state dict, the fixture's weight records)."""
    values, records = {}, []
    for seed, (key, tensor) in enumerate(model.state_dict().items()):
        shape = tuple(tensor.shape)
        scale, shift = fill_rule(key, shape)
        values[key] = (hashed_uniform(tensor.numel(), seed) * scale + shift).view(shape)
        records.append({"key": key, "shape": shape, "seed": seed, "scale": scale, "shift": shift,
                        "sum": float(values[key].double().sum())})
    return values, records


def official_state(official: torch.nn.Module, ours: dict[str, Tensor]) -> dict[str, Tensor]:
    """The official model's state dict from codetr's, through OFFICIAL_TO_CODETR; every codetr key used."""
    state, used = {}, set()
    for key, tensor in official.state_dict().items():
        if key in SPLIT_ROWS:
            state[key] = torch.cat([ours[part] for part in SPLIT_ROWS[key]])
            used.update(SPLIT_ROWS[key])
            continue
        source = codetr_key(key)
        if source is None:
            state[key] = torch.zeros_like(tensor)
            continue
        if ours[source].shape != tensor.shape:
            raise ValueError(f"{key} {tuple(tensor.shape)} <- {source} {tuple(ours[source].shape)}")
        state[key] = ours[source].clone()
        used.add(source)
    unused = sorted(set(ours) - used)
    if unused:
        raise KeyError(f"codetr keys with no official counterpart: {unused}")
    return state


def codetr_gradients(official: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official gradients under codetr's keys; a SPLIT_ROWS tensor's rows go to its codetr parts."""
    gradients = {}
    for key, grad in official.items():
        if key in SPLIT_ROWS:
            one_to_one, extra = SPLIT_ROWS[key]
            gradients[one_to_one], gradients[extra] = grad[:Q].clone(), grad[Q:].clone()
        else:
            gradients[codetr_key(key)] = grad.clone()
    return gradients


def import_official(root: Path) -> dict[str, types.ModuleType]:
    """The official modules, importable on a CPU-only machine without mmcv, wandb or the compiled op."""
    for stub in ("MultiScaleDeformableAttention", "wandb"):
        sys.modules.setdefault(stub, types.ModuleType(stub))
    swin = types.ModuleType("models.swin_transformer")
    swin.SwinTransformer = None
    sys.modules["models.swin_transformer"] = swin
    sys.path.insert(0, str(root))
    import engine
    import main
    import models.backbone as backbone
    import models.deformable_detr as deformable_detr
    import models.ops.modules.ms_deform_attn as msda_module
    import util.misc as misc
    from models.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch

    class PytorchMSDeformAttnFunction:
        """The official pure-PyTorch path in place of the CUDA Function (same arguments)."""

        @staticmethod
        def apply(value, shapes, level_start_index, locations, weights, im2col_step):
            return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    msda_module.MSDeformAttnFunction = PytorchMSDeformAttnFunction
    return {"engine": engine, "main": main, "backbone": backbone, "deformable_detr": deformable_detr, "misc": misc}


def build_official(mods: dict[str, types.ModuleType]):
    """(model, criterion, args) from the official `build`, with a ResNet-18 backbone."""
    import torchvision

    backbone_mod = mods["backbone"]
    args = mods["main"].get_args_parser().parse_args(OFFICIAL_ARGS)

    def resnet18_backbone(args):
        resnet = torchvision.models.resnet18(weights=None, norm_layer=backbone_mod.FrozenBatchNorm2d)
        body = backbone_mod.BackboneBase(resnet, train_backbone=args.lr_backbone > 0, return_interm_layers=True)
        body.num_channels = [128, 256, 512]
        return backbone_mod.Joiner(body, backbone_mod.build_position_encoding(args))

    mods["deformable_detr"].build_backbone = resnet18_backbone
    model, criterion, _ = mods["deformable_detr"].build(args)
    return model, criterion, args


def detached(tree):
    """A copy of nested dicts / lists of tensors with every tensor detached."""
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, dict):
        return {k: detached(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [detached(v) for v in tree]
    return tree


def make_batch() -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """(images [B, 3, H, W] zero-padded, masks [B, H, W] True = padding, targets cxcywh normalised)."""
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(len(IMG_SHAPES), 3, *BATCH_HW)
    masks = torch.ones(len(IMG_SHAPES), *BATCH_HW, dtype=torch.bool)
    targets = []
    for i, (h, w) in enumerate(IMG_SHAPES):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        masks[i, :h, :w] = False
        xyxy = torch.tensor(GT_BOXES_XYXY[i]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        cxcywh = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), -1)
        targets.append({"labels": torch.tensor(GT_LABELS[i]), "boxes": cxcywh})
    return images, masks, targets


def per_layer(out: dict, suffix: str = "") -> dict[str, Tensor]:
    """Every decoder layer's logits / boxes of one query set ("" one-to-one, "_one2many"): [L, B, N, *]."""
    layers = [*out["aux_outputs" + suffix], {"pred_logits": out["pred_logits" + suffix],
                                               "pred_boxes": out["pred_boxes" + suffix]}]
    return {"logits": torch.stack([l["pred_logits"] for l in layers]),
            "boxes": torch.stack([l["pred_boxes"] for l in layers])}


def matches(matcher, logits: Tensor, boxes: Tensor, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
    """The official matcher's pairs per image, ground-truth indices modulo the image's distinct boxes."""
    pairs = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    distinct = [len(labels) for labels in GT_LABELS]
    return [(query, gt % n) for (query, gt), n in zip(pairs, distinct)]


def official_training_step(model, criterion, args, train_hybrid, samples, targets: list[dict]) -> dict:
    """The official training forward, `engine.train_hybrid`'s losses, their weighted total (as `train_one_epoch`
    sums it: class_error and cardinality_error have no weight) and its gradients on GRADIENT_KEYS."""
    captured = {}
    model.transformer.encoder.register_forward_hook(lambda module, inputs, output: captured.update(memory=output))
    model.train()
    out = model(samples)
    losses = train_hybrid(out, copy.deepcopy(targets), args.k_one2many, criterion, args.lambda_one2many)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    total.backward()
    params = dict(model.named_parameters(remove_duplicate=False))  # bbox_embed is also under transformer.decoder
    out = detached(out)
    one2one, one2many, enc = per_layer(out), per_layer(out, "_one2many"), out["enc_outputs"]
    top = enc["pred_logits"][..., 0].topk(Q + M + 1, dim=1).values
    repeated = [{"labels": t["labels"].repeat(args.k_one2many), "boxes": t["boxes"].repeat(args.k_one2many, 1)}
                for t in targets]
    binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    return {
        "memory": captured["memory"].detach(),
        "enc_logits": enc["pred_logits"],
        "enc_boxes": enc["pred_boxes"],
        "topk_margin": float((top[:, :-1] - top[:, 1:]).min()),
        "one2one": one2one,
        "one2many": one2many,
        "matches": {
            "one2one": [matches(criterion.matcher, l, b, targets) for l, b in zip(*one2one.values())],
            "one2many": [matches(criterion.matcher, l, b, repeated) for l, b in zip(*one2many.values())],
            "enc": [matches(criterion.matcher, enc["pred_logits"], enc["pred_boxes"], binary)],
        },
        "losses": {k: torch.as_tensor(v, dtype=torch.float32).detach() for k, v in losses.items()},
        "weight_dict": dict(criterion.weight_dict),
        "total": total.detach(),
        "gradients": codetr_gradients({key: params[key].grad for key in GRADIENT_KEYS}),
    }


def official_inference(model, samples) -> dict[str, Tensor]:
    """Every decoder layer's one-to-one outputs as `engine.evaluate` runs the model: in eval mode, with
    num_queries and two_stage_num_proposals set to the one-to-one count (and restored after)."""
    saved = model.num_queries, model.transformer.two_stage_num_proposals
    model.eval()
    model.num_queries = model.transformer.two_stage_num_proposals = model.num_queries_one2one
    with torch.no_grad():
        evaluated = per_layer(model(samples))
    model.num_queries, model.transformer.two_stage_num_proposals = saved
    return evaluated


def record(root: Path, commit: str) -> dict:
    torch.set_num_threads(1)
    mods = import_official(root)
    cfg = apply_overrides(get_preset(PRESET), CODETR_OVERRIDES)
    ours = build_detector(cfg.model, NUM_CLASSES)
    values, records = filled_codetr_state(ours)
    ours.load_state_dict(values, strict=True)  # the records cover codetr's state dict exactly

    model, criterion, args = build_official(mods)
    model.load_state_dict(official_state(model, values), strict=True)
    images, masks, targets = make_batch()
    samples = mods["misc"].NestedTensor(images, masks)
    return {
        "source": {"repo": "HDETR/H-Deformable-DETR", "commit": commit},
        "config": {"preset": PRESET, "overrides": CODETR_OVERRIDES, "num_classes": NUM_CLASSES},
        "settings": {"args": OFFICIAL_ARGS},
        "weights": records,
        "inputs": {"images": images, "masks": masks, "targets": targets},
        **official_training_step(model, criterion, args, mods["engine"].train_hybrid, samples, targets),
        "eval": official_inference(model, samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("official_root", type=Path, help="an unpacked HDETR/H-Deformable-DETR checkout")
    parser.add_argument("--commit", default="unknown", help="its commit, stored in the fixture")
    cli = parser.parse_args()
    fixture = record(cli.official_root.resolve(), cli.commit)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, OUT)
    print(f"{OUT.name}: {OUT.stat().st_size / 1e6:.2f} MB, topk margin {fixture['topk_margin']:.2e}, losses "
          f"{ {k: round(float(v), 4) for k, v in fixture['losses'].items() if 'error' not in k} }")


if __name__ == "__main__":
    main()
