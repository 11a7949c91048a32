"""Sense-X/Co-DETR (mmdet 2.25, mmcv-full 1.5) Co-Deformable-DETR and Co-DINO checkpoints -> codetr.

mmdetection 3's projects/CO-DETR port of Co-DINO keeps the same key names, so its checkpoints convert here
too. The released `co_deformable_detr_r50_1x_coco` (49.5 AP) is the ++ model (two-stage, box refinement,
mixed query selection, look forward twice) with K = 2 auxiliary heads. Its key tree
(tests/fixtures/sensex_co_deformable_detr_r50_keys.txt lists every key and shape) and the codetr names:

    backbone.{conv1,bn1}.*, backbone.layerN.*          -> backbone.stem.{0,1}.*, backbone.stages.{N-1}.*
    neck.convs.i.{conv,gn}, neck.extra_convs.0.*       -> neck.lateral.i.{0,1}, neck.extra.{0,1}
    query_head.transformer.encoder.layers.i.           -> transformer.encoder_layers.i.
        attentions.0 / ffns.0.layers.{0.0,1} / norms.{0,1}     self_attn / ffn.{0,2} / norm{1,2}
    query_head.transformer.decoder.layers.i.           -> transformer.decoder.layers.i.
        attentions.0.attn / attentions.1 / norms.{0,1,2}       self_attn / cross_attn / norm{1,2,3}
    query_head.{cls,reg}_branches.{0..D-1} / .D        -> transformer.decoder.{class,box}_branches.* /
                                                          transformer.enc_{class,box}_branch (two-stage)
    query_head.query_embedding                         -> transformer.content_queries (mixed selection)
    query_head.downsample.{0,1}                        -> aux.feature_maps.downsample.{0,1}
    query_head.transformer.{aux_pos_trans,aux_pos_trans_norm,pos_feats_trans,pos_feats_norm}.k
                                                       -> aux.query_embeddings.j.{pos_trans,pos_trans_norm,
                                                          feature_proj,feature_norm}
    query_head.transformer.head_pos_embed.weight [K,1] -> aux.head_pos_embed [K,1] (rows reordered)
    rpn_head.{rpn_conv,rpn_cls,rpn_reg}                -> aux.heads.j.rpn.{tower.0,objectness,deltas}
    roi_head.0.bbox_head.{shared_fcs.0,shared_fcs.1,fc_cls,fc_reg}
                                                       -> aux.heads.j.roi_head.bbox_head.{fc1,fc2,cls,reg}
    bbox_head.0.{cls_convs,reg_convs}.m.{conv,gn}      -> aux.heads.j.{cls,reg}_tower.{3m,3m+1}
    bbox_head.0.{atss_cls,atss_reg,atss_centerness,scales.l.scale}
                                                       -> aux.heads.j.{cls_pred,reg_pred,centerness_pred,
                                                          level_scales.l.scale}

Co-DINO (recognised by its denoising label embedding) adds, on 5 feature levels (neck.convs.0-3 on C2..C5):

    query_head.transformer.decoder.ref_point_head.{0,2} -> transformer.decoder.ref_point_head.{0,2}
    query_head.transformer.decoder.norm                -> transformer.decoder.norm
    query_head.transformer.query_embed                 -> transformer.content_queries
    query_head.dn_generator.label_embedding            -> denoising.label_embedding
and its aux_pos_trans are Linear(2C, C) + LN(C) (the positive queries' content, without positional half).

Layouts are the same on both sides, so every tensor is copied as is: nn.MultiheadAttention's packed
q/k/v in_proj, deformable attention's (heads, levels, points, xy) offsets, the RoI classifier with
background LAST of num_classes + 1, its class-specific deltas [4 * num_classes] (class-major), the RPN's
anchors (ratios outer, scales inner). Only the order of the auxiliary heads differs: Sense-X numbers
them RoI heads first, then one-stage heads (co_detr.py builds the positive queries in that order);
codetr's presets list one-stage heads first (`[atss, faster_rcnn]`), so head index k becomes j.

Not carried (reported as skipped): BatchNorm `num_batches_tracked` counters (the backbone's BatchNorm is
frozen), and anything in UNREPRESENTABLE (nothing, for the released R50 model).
The mmdet head key names (rpn_head.*, roi_head.0.bbox_head.*, bbox_head.0.*) are mapped here directly.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from codetr.config import BackboneConfig, ModelConfig, get_preset
from codetr.convert.common import Conversion, ConversionError

SOURCE = "sensex"
RELEASED_PRESET = "co_deformable_detr_r50_1x"  # the released model; the converted config starts from it
BASELINE_PRESET = "deformable_detr_pp_r50_1x"  # the same without auxiliary heads
CO_DINO_PRESET, DINO_PRESET = "co_dino_5scale_r50_1x", "dino_5scale_r50_1x"  # the same for Co-DINO checkpoints
DINO_MARKER = "query_head.dn_generator.label_embedding.weight"
NUM_HEADS = 8  # attention heads of the released configs: the weights' shapes do not record it
# Foreign keys codetr has no place for, with why (printed by `codetr convert`).
UNREPRESENTABLE: dict[str, str] = {}
_RESNET_DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
                  (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
_ONE_STAGE_MARKERS = {"atss": "atss_centerness.weight"}  # one-stage head kind -> a key only it has


# -- the renaming rules ----------------------------------------------------------------------------------

_ATTN = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_WB = r"(weight|bias)"
# (pattern on the foreign key, codetr key template). Templates use the groups; {e:...} and {h:...} are
# resolved per architecture (encoder-proposal branch index, auxiliary head index).
_RULES: list[tuple[str, str]] = [
    (r"backbone\.conv1\.weight", "backbone.stem.0.weight"),
    (r"backbone\.bn1\.(weight|bias|running_mean|running_var)", "backbone.stem.1.{1}"),
    (r"backbone\.layer([1-4])\.(\d+)\.((?:conv[1-3]|bn[1-3]|downsample\.[01])\.(?:weight|bias|running_mean|running_var))",
     "backbone.stages.{1-1}.{2}.{3}"),
    (r"neck\.convs\.(\d+)\.conv\.weight", "neck.lateral.{1}.0.weight"),
    (r"neck\.convs\.(\d+)\.gn\." + _WB, "neck.lateral.{1}.1.{2}"),
    (r"neck\.extra_convs\.0\.conv\.weight", "neck.extra.0.weight"),
    (r"neck\.extra_convs\.0\.gn\." + _WB, "neck.extra.1.{1}"),
    (r"query_head\.transformer\.level_embeds", "transformer.level_embed"),
    (r"query_head\.transformer\.encoder\.layers\.(\d+)\.attentions\.0\." + _ATTN,
     "transformer.encoder_layers.{1}.self_attn.{2}.{3}"),
    (r"query_head\.transformer\.(encoder)\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\." + _WB, "{ffn:0}"),
    (r"query_head\.transformer\.(encoder)\.layers\.(\d+)\.ffns\.0\.layers\.1\." + _WB, "{ffn:2}"),
    (r"query_head\.transformer\.encoder\.layers\.(\d+)\.norms\.([01])\." + _WB,
     "transformer.encoder_layers.{1}.norm{2+1}.{3}"),
    (r"query_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     "transformer.decoder.layers.{1}.self_attn.{2}"),
    (r"query_head\.transformer\.decoder\.layers\.(\d+)\.attentions\.1\." + _ATTN,
     "transformer.decoder.layers.{1}.cross_attn.{2}.{3}"),
    (r"query_head\.transformer\.(decoder)\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\." + _WB, "{ffn:0}"),
    (r"query_head\.transformer\.(decoder)\.layers\.(\d+)\.ffns\.0\.layers\.1\." + _WB, "{ffn:2}"),
    (r"query_head\.transformer\.decoder\.layers\.(\d+)\.norms\.([012])\." + _WB,
     "transformer.decoder.layers.{1}.norm{2+1}.{3}"),
    (r"query_head\.transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\." + _WB, "transformer.{1}.{2}"),
    (r"query_head\.cls_branches\.(\d+)\." + _WB, "{cls}"),
    (r"query_head\.reg_branches\.(\d+)\.([024])\." + _WB, "{reg}"),
    (r"query_head\.query_embedding\.weight", "transformer.content_queries.weight"),
    (r"query_head\.transformer\.query_embed\.weight", "transformer.content_queries.weight"),
    (r"query_head\.transformer\.decoder\.ref_point_head\.([02])\." + _WB, "transformer.decoder.ref_point_head.{1}.{2}"),
    (r"query_head\.transformer\.decoder\.norm\." + _WB, "transformer.decoder.norm.{1}"),
    (r"query_head\.dn_generator\.label_embedding\.weight", "denoising.label_embedding.weight"),
    (r"query_head\.downsample\.0\." + _WB, "aux.feature_maps.downsample.0.{1}"),
    (r"query_head\.downsample\.1\." + _WB, "aux.feature_maps.downsample.1.{1}"),
    (r"query_head\.transformer\.head_pos_embed\.weight", "aux.head_pos_embed"),
    (r"query_head\.transformer\.aux_pos_trans\.(\d+)\." + _WB, "aux.query_embeddings.{h1}.pos_trans.{2}"),
    (r"query_head\.transformer\.aux_pos_trans_norm\.(\d+)\." + _WB, "aux.query_embeddings.{h1}.pos_trans_norm.{2}"),
    (r"query_head\.transformer\.pos_feats_trans\.(\d+)\." + _WB, "aux.query_embeddings.{h1}.feature_proj.{2}"),
    (r"query_head\.transformer\.pos_feats_norm\.(\d+)\." + _WB, "aux.query_embeddings.{h1}.feature_norm.{2}"),
    (r"rpn_head\.rpn_conv\." + _WB, "aux.heads.{rpn}.rpn.tower.0.{1}"),
    (r"rpn_head\.rpn_cls\." + _WB, "aux.heads.{rpn}.rpn.objectness.{1}"),
    (r"rpn_head\.rpn_reg\." + _WB, "aux.heads.{rpn}.rpn.deltas.{1}"),
    (r"roi_head\.(\d+)\.bbox_head\.shared_fcs\.0\." + _WB, "aux.heads.{roi1}.roi_head.bbox_head.fc1.{2}"),
    (r"roi_head\.(\d+)\.bbox_head\.shared_fcs\.1\." + _WB, "aux.heads.{roi1}.roi_head.bbox_head.fc2.{2}"),
    (r"roi_head\.(\d+)\.bbox_head\.fc_cls\." + _WB, "aux.heads.{roi1}.roi_head.bbox_head.cls.{2}"),
    (r"roi_head\.(\d+)\.bbox_head\.fc_reg\." + _WB, "aux.heads.{roi1}.roi_head.bbox_head.reg.{2}"),
    (r"bbox_head\.(\d+)\.(cls|reg)_convs\.(\d+)\.conv\.weight", "aux.heads.{one1}.{2}_tower.{3*3}.weight"),
    (r"bbox_head\.(\d+)\.(cls|reg)_convs\.(\d+)\.gn\." + _WB, "aux.heads.{one1}.{2}_tower.{3*3+1}.{4}"),
    (r"bbox_head\.(\d+)\.atss_cls\." + _WB, "aux.heads.{one1}.cls_pred.{2}"),
    (r"bbox_head\.(\d+)\.atss_reg\." + _WB, "aux.heads.{one1}.reg_pred.{2}"),
    (r"bbox_head\.(\d+)\.atss_centerness\." + _WB, "aux.heads.{one1}.centerness_pred.{2}"),
    (r"bbox_head\.(\d+)\.scales\.(\d+)\.scale", "aux.heads.{one1}.level_scales.{2}.scale"),
]
_COMPILED = [(re.compile(pattern), template) for pattern, template in _RULES]
_SKIPPED = re.compile(r"backbone\..*num_batches_tracked")


@dataclass
class Architecture:
    """What the Sense-X state dict says about the model, and where its auxiliary heads go."""

    model: ModelConfig
    num_classes: int
    sensex_to_codetr_head: list[int]  # Sense-X head index k (RoI heads, then one-stage) -> codetr index j
    roi_heads: list[int]  # codetr index of roi_head.i
    one_stage_heads: list[int]  # codetr index of bbox_head.i


def _match(key: str) -> tuple[re.Match, str] | None:
    for pattern, template in _COMPILED:
        found = pattern.fullmatch(key)
        if found:
            return found, template
    return None


def unmapped_keys(state_dict: dict[str, Tensor]) -> list[str]:
    """Keys no rule places (in the state dict's order), without the deliberately skipped ones."""
    return [k for k in state_dict if not _SKIPPED.fullmatch(k) and k not in UNREPRESENTABLE and _match(k) is None]


def _count(state_dict: dict[str, Tensor], pattern: str) -> int:
    """Number of distinct indices i of keys matching `pattern` (with one (\\d+) group)."""
    compiled = re.compile(pattern)
    return len({m.group(1) for k in state_dict if (m := compiled.match(k))})


def _need(state_dict: dict[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise ConversionError(f"sensex: {key} is missing: not a Sense-X Co-Deformable-DETR state dict "
                              "(two-stage with box refinement)")
    return state_dict[key]


def _backbone_depth(state_dict: dict[str, Tensor]) -> int:
    blocks = tuple(_count(state_dict, rf"backbone\.layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    depth = _RESNET_DEPTHS.get((*blocks, bottleneck))
    if depth is None:
        raise ConversionError(f"sensex: backbone with {blocks} blocks per stage ({'bottleneck' if bottleneck else 'basic'}) "
                              f"is not a ResNet-{'/'.join(map(str, sorted(set(_RESNET_DEPTHS.values()))))}")
    return depth


def _aux_heads(state_dict: dict[str, Tensor]) -> tuple[list[str], list[int], list[int], list[int]]:
    """(codetr head kinds, Sense-X head index k -> codetr index j, codetr index of each roi_head.i, of each
    bbox_head.i). Sense-X numbers its heads RoI heads first; codetr lists one-stage heads first."""
    num_roi = _count(state_dict, r"roi_head\.(\d+)\.")
    num_one_stage = _count(state_dict, r"bbox_head\.(\d+)\.")
    kinds = []
    for i in range(num_one_stage):
        kind = next((k for k, marker in _ONE_STAGE_MARKERS.items() if f"bbox_head.{i}.{marker}" in state_dict), None)
        if kind is None:
            raise ConversionError(f"sensex: bbox_head.{i} is not a head codetr converts (known: {', '.join(_ONE_STAGE_MARKERS)})")
        kinds.append(kind)
    if num_roi > 1:
        raise ConversionError(f"sensex: {num_roi} RoI heads share one RPN; codetr's faster_rcnn head has its own RPN")
    if num_roi != ("rpn_head.rpn_cls.weight" in state_dict):
        raise ConversionError("sensex: an RPN without a RoI head (or the reverse) cannot be represented in codetr")
    kinds += ["faster_rcnn"] * num_roi
    one_stage_heads = list(range(num_one_stage))
    roi_heads = list(range(num_one_stage, num_one_stage + num_roi))
    return kinds, roi_heads + one_stage_heads, roi_heads, one_stage_heads


# A key only that naming of a Swin backbone has -> its converter (codetr/convert/swin_keys.py)
_SWIN_NAMINGS = {"backbone.patch_embed.projection.weight": "mmdet", "backbone.patch_embed.proj.weight": "sensex"}


@dataclass
class SwinWeights:
    kind: str  # a codetr Swin size (model.backbone.kind)
    state_dict: dict[str, Tensor]  # the backbone's tensors under codetr's names, "backbone." included


def convert_swin_backbone(state_dict: dict[str, Tensor]) -> SwinWeights | None:
    """A Swin backbone's tensors (mmdet 3 or Sense-X naming) converted, or None for a ResNet checkpoint.
    Its size must be one Co-DETR releases (SWIN_SIZES)."""
    naming = next((name for key, name in _SWIN_NAMINGS.items() if key in state_dict), None)
    if naming is None:
        return None
    from codetr.convert.swin_keys import convert_mmdet_swin, convert_sensex_swin, swin_architecture
    from codetr.models.swin import SWIN_SIZES

    converted = (convert_mmdet_swin if naming == "mmdet" else convert_sensex_swin)(state_dict, "backbone.")
    arch = swin_architecture(converted)
    structure = {k: arch[k] for k in ("embed_dim", "depths", "num_heads", "window_size")}
    kind = next((name for name, size in SWIN_SIZES.items() if all(size[k] == v for k, v in structure.items())), None)
    if kind is None:
        raise ConversionError(f"sensex: a Swin backbone {structure} that is none of Co-DETR's sizes ({', '.join(SWIN_SIZES)})")
    return SwinWeights(kind, {f"backbone.{k}": v for k, v in converted.items()})


def read_architecture(state_dict: dict[str, Tensor], swin: SwinWeights | None = None) -> Architecture:
    """The codetr ModelConfig that the Sense-X state dict's keys and shapes describe (`swin`: its Swin
    backbone, converted apart; the ResNet is read off the keys)."""
    level_embeds = _need(state_dict, "query_head.transformer.level_embeds")
    num_levels, d_model = level_embeds.shape
    num_decoder = _count(state_dict, r"query_head\.transformer\.decoder\.layers\.(\d+)\.")
    num_branches = _count(state_dict, r"query_head\.cls_branches\.(\d+)\.")
    if num_branches != num_decoder + 1 or "query_head.transformer.enc_output.weight" not in state_dict:
        raise ConversionError(f"sensex: {num_branches} class branches for {num_decoder} decoder layers: codetr models "
                              "are two-stage with box refinement (decoder layers + 1 branches)")
    weights_rows = _need(state_dict, "query_head.transformer.encoder.layers.0.attentions.0.attention_weights.weight").shape[0]
    if weights_rows % (NUM_HEADS * num_levels):
        raise ConversionError(f"sensex: attention_weights has {weights_rows} rows, not a multiple of "
                              f"{NUM_HEADS} heads x {num_levels} levels")
    kinds, k_to_j, roi_heads, one_stage_heads = _aux_heads(state_dict)
    dino = DINO_MARKER in state_dict
    presets = (CO_DINO_PRESET, DINO_PRESET) if dino else (RELEASED_PRESET, BASELINE_PRESET)
    model = copy.deepcopy(get_preset(presets[0] if kinds else presets[1]).model)
    model.two_stage = model.with_box_refine = True  # the branches counted above say so
    if swin is not None:
        model.backbone = BackboneConfig(kind=swin.kind, frozen_stages=0)
        out_norms = sorted(int(k.split(".")[2]) for k in swin.state_dict if k.startswith("backbone.out_norms.") and k.endswith(".weight"))
        if out_norms != list(range(5 - num_levels, 4)):
            raise ConversionError(f"sensex: the Swin backbone returns stages {out_norms} but the transformer has "
                                  f"{num_levels} levels (stages {list(range(5 - num_levels, 4))} + one extra)")
    else:
        model.backbone.depth = _backbone_depth(state_dict)
    model.backbone.pretrained = ""
    t = model.transformer
    t.d_model, t.num_levels, t.num_heads, t.dropout = d_model, num_levels, NUM_HEADS, 0.0
    t.num_points = weights_rows // (NUM_HEADS * num_levels)
    t.num_encoder_layers = _count(state_dict, r"query_head\.transformer\.encoder\.layers\.(\d+)\.")
    t.num_decoder_layers = num_decoder
    t.ffn_dim = _need(state_dict, "query_head.transformer.encoder.layers.0.ffns.0.layers.0.0.weight").shape[0]
    queries_key = "query_head.transformer.query_embed.weight" if dino else "query_head.query_embedding.weight"
    queries = state_dict.get(queries_key)
    if queries is not None and queries.shape[1] != d_model:
        raise ConversionError(f"sensex: {queries_key} is {tuple(queries.shape)}: codetr's learned content queries "
                              f"are [num_queries, {d_model}]")
    if dino and queries is None:
        raise ConversionError(f"sensex: a Co-DINO state dict without {queries_key}")
    model.mixed_selection = queries is not None
    model.num_queries = queries.shape[0] if queries is not None else 300  # two_stage_num_proposals (config only)
    num_classes = _need(state_dict, "query_head.cls_branches.0.weight").shape[0]
    model.aux.heads = kinds
    if kinds:
        k = _count(state_dict, r"query_head\.transformer\.aux_pos_trans\.(\d+)\.")
        if k != len(kinds):
            raise ConversionError(f"sensex: {k} positive-query projections (aux_pos_trans) for {len(kinds)} auxiliary "
                                  "heads; codetr gives every head its positive queries")
        embed = state_dict.get("query_head.transformer.head_pos_embed.weight")
        model.aux.head_pos_embed = "none" if embed is None else ("scalar" if embed.shape[1] == 1 else "vector")
        model.aux.content_feature = "query_head.transformer.pos_feats_trans.0.weight" in state_dict
        if one_stage_heads:
            model.aux.num_convs = _count(state_dict, r"bbox_head\.0\.cls_convs\.(\d+)\.")
        if roi_heads:
            model.aux.rcnn_fc_channels = _need(state_dict, "roi_head.0.bbox_head.shared_fcs.0.weight").shape[0]
    return Architecture(model, num_classes, k_to_j, roi_heads, one_stage_heads)


def _render(found: re.Match, template: str, arch: Architecture) -> str:
    """Fill a rule's template: {n} group n, {n-1} / {n+1} / {n*3} / {n*3+1} arithmetic on it, and the
    architecture-dependent fields ({cls}, {reg}, {ffn:i}, {h1}, {rpn}, {roi1}, {one1})."""
    groups = found.groups()
    decoder_layers = arch.model.transformer.num_decoder_layers

    def field_value(name: str) -> str:
        if name in ("cls", "reg"):
            index = int(groups[0])
            branch = "class" if name == "cls" else "box"
            where = f"transformer.enc_{branch}_branch" if index == decoder_layers else f"transformer.decoder.{branch}_branches.{index}"
            return ".".join([where, *groups[1:]])
        if name.startswith("ffn:"):
            place = "transformer.encoder_layers" if groups[0] == "encoder" else "transformer.decoder.layers"
            return f"{place}.{groups[1]}.ffn.{name[4:]}.{groups[2]}"
        if name == "h1":
            return str(arch.sensex_to_codetr_head[int(groups[0])])
        if name == "rpn":
            return str(arch.roi_heads[0])
        if name == "roi1":
            return str(arch.roi_heads[int(groups[0])])
        if name == "one1":
            return str(arch.one_stage_heads[int(groups[0])])
        arithmetic = re.fullmatch(r"(\d)(?:([-+*])(\d)(?:\+(\d))?)?", name)
        value = groups[int(arithmetic.group(1)) - 1]
        if arithmetic.group(2) is None:
            return value
        operand = int(arithmetic.group(3))
        number = {"-": int(value) - operand, "+": int(value) + operand, "*": int(value) * operand}[arithmetic.group(2)]
        return str(number + int(arithmetic.group(4) or 0))

    return re.sub(r"\{([^}]+)\}", lambda m: field_value(m.group(1)), template)


def _listed(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def expected_shapes(model: ModelConfig, num_classes: int) -> dict[str, torch.Size]:
    """codetr's parameter and buffer shapes for `model` (built on the meta device: no memory, no init)."""
    from codetr.models.detector import build_detector

    with torch.device("meta"):
        detector = build_detector(model, num_classes)
    return {k: v.shape for k, v in detector.state_dict().items()}


def convert(state_dict: dict[str, Tensor]) -> Conversion:
    """Rename a Sense-X Co-Deformable-DETR / Co-DINO state dict to codetr's names (every tensor copied as is,
    but a Swin backbone's patch merging in mmdet's order, which is permuted back).

    Raises ConversionError naming the foreign keys no rule places, the codetr keys nothing fills, or the
    first shape mismatch (both keys, both shapes).
    """
    swin = convert_swin_backbone(state_dict)
    if swin is not None:  # converted apart (codetr/convert/swin_keys.py); the rules see the rest
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
    unmapped = unmapped_keys(state_dict)
    if unmapped:
        raise ConversionError(f"sensex: {len(unmapped)} keys have no codetr counterpart: {_listed(unmapped)}")
    arch = read_architecture(state_dict, swin)
    expected = expected_shapes(arch.model, arch.num_classes)
    converted: dict[str, Tensor] = dict(swin.state_dict) if swin is not None else {}
    skipped = []
    for key, value in state_dict.items():
        if _SKIPPED.fullmatch(key) or key in UNREPRESENTABLE:
            skipped.append(key)
            continue
        found, template = _match(key)
        target = _render(found, template, arch)
        if target == "aux.head_pos_embed":  # rows in Sense-X head order -> codetr head order
            value = value[torch.argsort(torch.tensor(arch.sensex_to_codetr_head))]
        if target not in expected:
            raise ConversionError(f"sensex: {key} maps to {target}, which codetr's model (read off the keys) does not have")
        if value.shape != expected[target]:
            raise ConversionError(f"sensex: {key} is {tuple(value.shape)} but codetr's {target} is {tuple(expected[target])}")
        converted[target] = value
    missing = [k for k in expected if k not in converted]
    if missing:
        raise ConversionError(f"sensex: {len(missing)} codetr keys have no source in the state dict: {_listed(missing)}")
    return Conversion(model=arch.model, state_dict=converted, num_classes=arch.num_classes, skipped=skipped)
