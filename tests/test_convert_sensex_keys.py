"""The key / shape list of Sense-X's Co-Deformable-DETR, derived from the released code (not from codetr).

`sensex_key_shapes(dims)` writes out, module by module, the state dict that Sense-X/Co-DETR's
`co_deformable_detr_r50_1x_coco.py` builds, following the code that names each parameter:
- backbone: mmdet 2.25 ResNet (torchvision names: conv1, bn1, layerN.i.{convK,bnK,downsample.0/1}; BN
  buffers incl. num_batches_tracked);
- neck: mmdet ChannelMapper, ConvModule(conv without bias + GN) -> convs.i.{conv,gn}, extra_convs.0;
- query_head: projects/models/co_deformable_detr_head.py (CoDeformDETRHead._init_layers: downsample =
  Conv2d(3x3, stride 2, WITH bias) + GroupNorm; cls_branches / reg_branches, num_decoder_layers + 1 clones,
  reg = Linear, ReLU, Linear, ReLU, Linear; query_embedding [num_query, embed_dims] for mixed selection);
- query_head.transformer: mmdet 2.25 DeformableDetrTransformer (level_embeds, enc_output(_norm),
  pos_trans(_norm) 2d -> 2d) + projects/models/transformer.py CoDeformableDetrTransformer
  (head_pos_embed = nn.Embedding(num_co_heads, 1, ...) -> [K, 1]; per head aux_pos_trans 2d -> 2d,
  aux_pos_trans_norm LN(2d), pos_feats_trans d -> d, pos_feats_norm LN(d));
- encoder / decoder layers: mmcv 1.5 BaseTransformerLayer (attentions.i, ffns.0.layers.{0.0,1}, norms.i),
  MultiScaleDeformableAttention (sampling_offsets H*L*P*2, attention_weights H*L*P, value_proj, output_proj),
  mmcv MultiheadAttention wrapping nn.MultiheadAttention as `attn` (in_proj_weight [3d, d], out_proj);
- rpn_head: mmdet RPNHead (rpn_conv 3x3 with bias, rpn_cls A*1 (sigmoid), rpn_reg A*4, 1x1);
- roi_head.0.bbox_head: mmdet Shared2FCBBoxHead (shared_fcs.0 [fc, 256*7*7], shared_fcs.1, fc_cls
  [num_classes + 1, fc], fc_reg [4 * num_classes, fc], reg_class_agnostic=False);
- bbox_head.0: CoATSSHead (projects/models/co_atss_head.py = mmdet ATSSHead layers: cls_convs / reg_convs
  ConvModule(conv, gn), atss_cls, atss_reg, atss_centerness 3x3, scales.l.scale one per stride).
The R50 list is committed as tests/fixtures/sensex_co_deformable_detr_r50_keys.txt; smaller `dims` give the
CPU-fast variants the conversion tests use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "sensex_co_deformable_detr_r50_keys.txt"

_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class SenseXDims:
    depth: int = 50
    d_model: int = 256
    ffn_dim: int = 2048
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    num_queries: int = 300
    num_classes: int = 80
    rcnn_fc: int = 1024
    num_convs: int = 1  # ATSS stacked convs
    rpn_anchors: int = 9  # 3 scales x 3 ratios
    atss_anchors: int = 1
    aux_strides: int = 5  # 8..128


TINY = SenseXDims(depth=18, d_model=32, ffn_dim=64, num_points=2, num_encoder_layers=1, num_decoder_layers=2,
                  num_queries=20, num_classes=6, rcnn_fc=32)


def _bn(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{n}", (channels,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())]


def _linear(prefix: str, out_features: int, in_features: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (out_features, in_features)), (f"{prefix}.bias", (out_features,))]


def _norm(prefix: str, channels: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,))]


def _conv(prefix: str, out_c: int, in_c: int, k: int, bias: bool) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (out_c, in_c, k, k))] + ([(f"{prefix}.bias", (out_c,))] if bias else [])


def backbone_keys(depth: int) -> list[tuple[str, tuple[int, ...]]]:
    """mmdet ResNet (style='pytorch'): the stride sits in conv2 of a Bottleneck, like torchvision."""
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    keys = _conv("backbone.conv1", 64, 3, 7, False) + _bn("backbone.bn1", 64)
    inplanes = 64
    for stage, blocks in enumerate(_BLOCKS[depth], start=1):
        planes = 64 * 2 ** (stage - 1)
        for block in range(blocks):
            p = f"backbone.layer{stage}.{block}"
            if bottleneck:
                keys += _conv(f"{p}.conv1", planes, inplanes, 1, False) + _bn(f"{p}.bn1", planes)
                keys += _conv(f"{p}.conv2", planes, planes, 3, False) + _bn(f"{p}.bn2", planes)
                keys += _conv(f"{p}.conv3", planes * 4, planes, 1, False) + _bn(f"{p}.bn3", planes * 4)
            else:
                keys += _conv(f"{p}.conv1", planes, inplanes, 3, False) + _bn(f"{p}.bn1", planes)
                keys += _conv(f"{p}.conv2", planes, planes, 3, False) + _bn(f"{p}.bn2", planes)
            stride = 1 if stage == 1 else 2
            if block == 0 and (stride != 1 or inplanes != planes * expansion):
                keys += _conv(f"{p}.downsample.0", planes * expansion, inplanes, 1, False)
                keys += _bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    return keys


def _msda(prefix: str, d: SenseXDims) -> list[tuple[str, tuple[int, ...]]]:
    hlp = d.num_heads * d.num_levels * d.num_points
    return (_linear(f"{prefix}.sampling_offsets", hlp * 2, d.d_model) + _linear(f"{prefix}.attention_weights", hlp, d.d_model)
            + _linear(f"{prefix}.value_proj", d.d_model, d.d_model) + _linear(f"{prefix}.output_proj", d.d_model, d.d_model))


def _ffn(prefix: str, d: SenseXDims) -> list[tuple[str, tuple[int, ...]]]:
    return _linear(f"{prefix}.ffns.0.layers.0.0", d.ffn_dim, d.d_model) + _linear(f"{prefix}.ffns.0.layers.1", d.d_model, d.ffn_dim)


def sensex_key_groups(d: SenseXDims = SenseXDims()) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Every key and shape of the Sense-X state dict, grouped by the code that names them."""
    dm, c = d.d_model, d.num_classes
    expansion = 4 if d.depth >= 50 else 1
    in_channels = [128 * expansion, 256 * expansion, 512 * expansion]
    neck = []
    for i, channels in enumerate(in_channels):
        neck += _conv(f"neck.convs.{i}.conv", dm, channels, 1, False) + _norm(f"neck.convs.{i}.gn", dm)
    neck += _conv("neck.extra_convs.0.conv", dm, in_channels[-1], 3, False) + _norm("neck.extra_convs.0.gn", dm)
    t = "query_head.transformer"
    transformer = [(f"{t}.level_embeds", (d.num_levels, dm))]
    for i in range(d.num_encoder_layers):
        p = f"{t}.encoder.layers.{i}"
        transformer += _msda(f"{p}.attentions.0", d) + _ffn(p, d) + _norm(f"{p}.norms.0", dm) + _norm(f"{p}.norms.1", dm)
    for i in range(d.num_decoder_layers):
        p = f"{t}.decoder.layers.{i}"
        transformer += [(f"{p}.attentions.0.attn.in_proj_weight", (3 * dm, dm)), (f"{p}.attentions.0.attn.in_proj_bias", (3 * dm,))]
        transformer += _linear(f"{p}.attentions.0.attn.out_proj", dm, dm) + _msda(f"{p}.attentions.1", d) + _ffn(p, d)
        transformer += _norm(f"{p}.norms.0", dm) + _norm(f"{p}.norms.1", dm) + _norm(f"{p}.norms.2", dm)
    transformer += _linear(f"{t}.enc_output", dm, dm) + _norm(f"{t}.enc_output_norm", dm)
    transformer += _linear(f"{t}.pos_trans", 2 * dm, 2 * dm) + _norm(f"{t}.pos_trans_norm", 2 * dm)
    num_co_heads = 2
    co = [(f"{t}.head_pos_embed.weight", (num_co_heads, 1))]
    for k in range(num_co_heads):
        co += _linear(f"{t}.aux_pos_trans.{k}", 2 * dm, 2 * dm) + _norm(f"{t}.aux_pos_trans_norm.{k}", 2 * dm)
        co += _linear(f"{t}.pos_feats_trans.{k}", dm, dm) + _norm(f"{t}.pos_feats_norm.{k}", dm)
    head = _conv("query_head.downsample.0", dm, dm, 3, True) + _norm("query_head.downsample.1", dm)
    for i in range(d.num_decoder_layers + 1):
        head += _linear(f"query_head.cls_branches.{i}", c, dm)
    for i in range(d.num_decoder_layers + 1):
        head += (_linear(f"query_head.reg_branches.{i}.0", dm, dm) + _linear(f"query_head.reg_branches.{i}.2", dm, dm)
                 + _linear(f"query_head.reg_branches.{i}.4", 4, dm))
    head += [("query_head.query_embedding.weight", (d.num_queries, dm))]
    rpn = (_conv("rpn_head.rpn_conv", dm, dm, 3, True) + _conv("rpn_head.rpn_cls", d.rpn_anchors, dm, 1, True)
           + _conv("rpn_head.rpn_reg", 4 * d.rpn_anchors, dm, 1, True))
    b = "roi_head.0.bbox_head"
    roi = (_linear(f"{b}.shared_fcs.0", d.rcnn_fc, dm * 7 * 7) + _linear(f"{b}.shared_fcs.1", d.rcnn_fc, d.rcnn_fc)
           + _linear(f"{b}.fc_cls", c + 1, d.rcnn_fc) + _linear(f"{b}.fc_reg", 4 * c, d.rcnn_fc))
    atss = []
    for branch in ("cls", "reg"):
        for m in range(d.num_convs):
            atss += _conv(f"bbox_head.0.{branch}_convs.{m}.conv", dm, dm, 3, False) + _norm(f"bbox_head.0.{branch}_convs.{m}.gn", dm)
    atss += (_conv("bbox_head.0.atss_cls", d.atss_anchors * c, dm, 3, True) + _conv("bbox_head.0.atss_reg", 4 * d.atss_anchors, dm, 3, True)
             + _conv("bbox_head.0.atss_centerness", d.atss_anchors, dm, 3, True))
    atss += [(f"bbox_head.0.scales.{level}.scale", ()) for level in range(d.aux_strides)]
    return {
        "backbone: mmdet ResNet (torchvision names, BN buffers incl. num_batches_tracked)": backbone_keys(d.depth),
        "neck: mmdet ChannelMapper (ConvModule conv no bias + gn; one extra conv on C5)": neck,
        "query_head.transformer: mmdet DeformableDetrTransformer + mmcv BaseTransformerLayer / "
        "MultiScaleDeformableAttention / MultiheadAttention(attn) / FFN(layers.0.0, layers.1)": transformer,
        "query_head.transformer: Sense-X CoDeformableDetrTransformer (head_pos_embed [K,1], per-head aux_pos_trans "
        "2d->2d + LN(2d), pos_feats_trans d->d + LN(d)); k = 0 RoI head, 1 ATSS": co,
        "query_head: Sense-X CoDeformDETRHead (downsample conv WITH bias + GN, D+1 cls/reg branches, query_embedding)": head,
        "rpn_head: mmdet RPNHead (9 anchors: 3 ratios x 3 scales)": rpn,
        "roi_head.0: mmdet Shared2FCBBoxHead (fc_cls num_classes+1, background last; fc_reg class-specific)": roi,
        "bbox_head.0: Sense-X CoATSSHead = mmdet ATSSHead layers (stacked_convs=1, GN, scales per stride)": atss,
    }


def sensex_key_shapes(d: SenseXDims = SenseXDims()) -> list[tuple[str, tuple[int, ...]]]:
    return [item for group in sensex_key_groups(d).values() for item in group]


def render_fixture(d: SenseXDims = SenseXDims()) -> str:
    lines = ["# Sense-X/Co-DETR co_deformable_detr_r50_1x_coco (49.5 AP) state dict: one `key shape` per line.",
             "# Derived from the released code (projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py,",
             "# projects/models/{co_detr,co_deformable_detr_head,transformer,co_atss_head}.py, mmdet 2.25.3 and",
             "# mmcv-full 1.5 module naming); regenerate with tests/test_convert_sensex_keys.py:render_fixture()."]
    for title, items in sensex_key_groups(d).items():
        lines.append(f"# -- {title}")
        lines += [f"{key} {list(shape)}".replace(", ", ",") for key, shape in items]
    return "\n".join(lines) + "\n"


def read_fixture(path: Path = FIXTURE) -> list[tuple[str, tuple[int, ...]]]:
    items = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            items.append((key, tuple(int(x) for x in shape.strip("[]").split(",") if x)))
    return items


def random_state_dict(d: SenseXDims = SenseXDims(), seed: int = 0) -> dict[str, torch.Tensor]:
    """A Sense-X-named state dict with random values (num_batches_tracked as int64, like BatchNorm's)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sensex_key_shapes(d):
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            out[key] = torch.randn(shape, generator=generator) * 0.02
    return out


def test_fixture_is_the_derivation():
    """The committed R50 list is exactly what the derivation gives (a change to either shows here)."""
    assert read_fixture() == sensex_key_shapes(SenseXDims())


def test_fixture_counts_and_quirks():
    items = dict(read_fixture())
    assert len(items) == len(read_fixture())  # no duplicate keys
    assert items["query_head.transformer.head_pos_embed.weight"] == (2, 1)
    assert items["query_head.transformer.aux_pos_trans.0.weight"] == (512, 512)
    assert items["query_head.transformer.aux_pos_trans_norm.1.weight"] == (512,)
    assert items["roi_head.0.bbox_head.fc_cls.weight"] == (81, 1024)
    assert items["roi_head.0.bbox_head.fc_reg.weight"] == (320, 1024)
    assert items["query_head.downsample.0.bias"] == (256,)
    assert sum(1 for k in items if k.startswith("query_head.cls_branches.") and k.endswith(".weight")) == 7
    assert sum(1 for k in items if k.startswith("backbone.layer") and k.endswith(".conv1.weight")) == 16  # 3+4+6+3 blocks
    # ResNet-50 parameters (no fc): 23.5M; the whole model's parameters and buffers
    assert sum(torch.Size(s).numel() for k, s in items.items() if k.startswith("backbone.")
               and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == 23_508_032


def test_backbone_keys_are_torchvision_resnet():
    """mmdet's ResNet names its parameters like torchvision's: an independent check of backbone_keys."""
    import torchvision

    for depth, factory in ((18, torchvision.models.resnet18), (50, torchvision.models.resnet50)):
        reference = {k: tuple(v.shape) for k, v in factory(weights=None).state_dict().items() if not k.startswith("fc.")}
        assert dict((k.removeprefix("backbone."), s) for k, s in backbone_keys(depth)) == reference
