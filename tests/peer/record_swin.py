"""Record mmdetection 3.3's SwinTransformer backbone (mmdet.models.backbones.swin) on small configs.

Run by hand in the peer venv (never by CI, never imported by tests):

    ~/.cache/codetr-peer/venv/bin/python tests/peer/record_swin.py

Cases (`CASES`), each a shrunk SwinTransformer (embed_dims 16, two blocks per stage so every stage has a
shifted block, drop path 0) in eval mode, on images whose sizes exercise every padding: the patch
embedding's (H, W not multiples of 4), patch merging's (odd stage sizes), the windows' (no stage size a
multiple of the window) and maps smaller than one window, where mmdet still shifts and masks:
  - "w7": window 7, a batch of 2 images 99 x 78 (stages 25x20, 13x10, 7x5, 4x3), out_indices (0, 1, 2, 3);
  - "w12": window 12, one image 130 x 100 (33x25, 17x13, 9x7, 5x4), out_indices (1, 2, 3) (no norm0, as
    Co-Deformable-DETR's Swin configs have it);
  - "w7_sensex": the "w7" model filled through the original Swin / Sense-X `SwinTransformerV1` names
    (`layers.s.blocks.b.attn.qkv`, `mlp.fc1`, ..., patch merging in concat order) and loaded the way
    mmdet loads such checkpoints, through mmdet's own `swin_converter` (convert_weights=True); the
    recorder checks that the converter turns those names into exactly mmdet's keys.

Weights are not stored: every tensor is `hashed_uniform(numel, seed) * scale + shift` (the fill of
record_deformable_detr.py, imported from it), except relative_position_index, which must be the real
index: it is loaded from mmdet's own buffer and stored once per case (int16 [N, N]; the recorder checks
every block holds the same). Images are `hashed_uniform(numel, seed) * sqrt(3)` (std 1), also not stored.

Writes tests/fixtures/peer/swin.pt (torch.save of plain tensors, dicts and lists):
  - "cases": {name: {"config": mmdet SwinTransformer kwargs, "layout": "mmdet" | "sensex", "prefix",
    "weights": [{key, shape, dtype, seed, scale, shift, alias_of, sum}] in state-dict order (keys with the
    prefix, as a detector checkpoint has them), "relative_position_index": int16 [N, N],
    "image": {shape, seed, scale, sum}, "outputs": list of [B, C_i, H_i, W_i] float32}};
  - "swin_l_layout": [{key, shape, dtype}] of mmdet's SwinTransformer with the released Co-DINO Swin-L
    config (embed_dims 192, depths [2, 2, 18, 2], heads [6, 12, 24, 48], window 12), "backbone."-prefixed;
  - "versions": torch / mmdet / mmcv.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from record_deformable_detr import filled_state_dict, hashed_uniform  # same folder: run as a script

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "peer" / "swin.pt"
PREFIX = "backbone."
SMALL = dict(embed_dims=16, depths=(2, 2, 2, 2), mlp_ratio=4, qkv_bias=True, patch_norm=True, drop_rate=0.0,
             attn_drop_rate=0.0, drop_path_rate=0.0)
CASES = {  # name: (SwinTransformer kwargs, image shape, layout the weights are filled in)
    "w7": (dict(SMALL, num_heads=(1, 2, 4, 8), window_size=7, out_indices=(0, 1, 2, 3)), (2, 3, 99, 78), "mmdet"),
    "w12": (dict(SMALL, num_heads=(1, 2, 2, 4), window_size=12, out_indices=(1, 2, 3)), (1, 3, 130, 100), "mmdet"),
    "w7_sensex": (dict(SMALL, num_heads=(1, 2, 4, 8), window_size=7, out_indices=(0, 1, 2, 3)), (2, 3, 99, 78), "sensex"),
}
SWIN_L = dict(pretrain_img_size=384, embed_dims=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12,
              mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.3,
              patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=True, convert_weights=True)
IMAGE_SEED = 7_000
# mmdet key piece -> original Swin / Sense-X SwinTransformerV1 key piece (the inverse of mmdet's swin_converter)
TO_ORIGINAL = [("patch_embed.projection.", "patch_embed.proj."), ("attn.w_msa.", "attn."),
               ("ffn.layers.0.0.", "mlp.fc1."), ("ffn.layers.1.", "mlp.fc2.")]


def original_name(mmdet_key: str) -> str:
    """An mmdet SwinTransformer key under the original Swin repo's name (no prefix)."""
    key = mmdet_key.replace("stages.", "layers.", 1)
    for piece, original in TO_ORIGINAL:
        key = key.replace(piece, original)
    return key


def fill(named: dict[str, Tensor], real_index: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[dict]]:
    """Hashed values for `named` (key -> tensor, giving shapes and order); relative_position_index keys
    take their real value from `real_index`."""
    values, records = filled_state_dict(SimpleNamespace(state_dict=lambda: named))
    for record in records:
        if record["key"].endswith("relative_position_index"):
            values[record["key"]] = real_index[record["key"]].clone()
            record["sum"] = float(values[record["key"]].double().sum())
    return values, records


@torch.no_grad()
def record_case(config: dict, image_shape: tuple[int, ...], layout: str) -> dict:
    from mmdet.models.backbones import SwinTransformer
    from mmdet.models.backbones.swin import swin_converter

    model = SwinTransformer(**config)
    model.eval()  # mmdet's train() returns None: no chaining
    own = model.state_dict()
    indices = [v for k, v in own.items() if k.endswith("relative_position_index")]
    assert all(torch.equal(i, indices[0]) for i in indices), "blocks hold different relative position indices"
    if layout == "mmdet":
        values, records = fill(own, own)
        model.load_state_dict(values, strict=True)
    else:
        original = {original_name(k): v for k, v in own.items()}
        values, records = fill(original, original)
        converted = swin_converter(values)  # what mmdet does to an original checkpoint (convert_weights=True)
        assert list(converted) == [PREFIX + k for k in own], "original names do not convert to mmdet's keys"
        model.load_state_dict({k[len(PREFIX):]: v for k, v in converted.items()}, strict=True)
    for record in records:
        record["key"] = PREFIX + record["key"]
        if record["alias_of"] is not None:
            record["alias_of"] = PREFIX + record["alias_of"]

    numel = int(torch.Size(image_shape).numel())
    images = (hashed_uniform(numel, IMAGE_SEED) * 3**0.5).view(image_shape)
    outputs = [o.clone() for o in model(images)]
    return {
        "config": config, "layout": layout, "prefix": PREFIX, "weights": records,
        "relative_position_index": indices[0].to(torch.int16),
        "image": {"shape": tuple(image_shape), "seed": IMAGE_SEED, "scale": 3**0.5, "sum": float(images.double().sum())},
        "outputs": outputs,
    }


def swin_l_layout() -> list[dict]:
    from mmdet.models.backbones import SwinTransformer

    state = SwinTransformer(**SWIN_L).state_dict()
    return [{"key": PREFIX + k, "shape": tuple(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in state.items()]


def main() -> None:
    import mmcv
    import mmdet

    torch.set_num_threads(1)
    fixture = {"cases": {}, "versions": {"torch": str(torch.__version__), "mmdet": mmdet.__version__, "mmcv": mmcv.__version__}}
    for name, (config, image_shape, layout) in CASES.items():
        case = record_case(config, image_shape, layout)
        fixture["cases"][name] = case
        print(f"{name}: outputs {[tuple(o.shape) for o in case['outputs']]}, "
              f"std {[round(float(o.std()), 3) for o in case['outputs']]}")
    fixture["swin_l_layout"] = swin_l_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, OUT)
    print(f"{OUT.name}: {OUT.stat().st_size / 1e6:.2f} MB, swin-l layout {len(fixture['swin_l_layout'])} keys")


if __name__ == "__main__":
    main()
