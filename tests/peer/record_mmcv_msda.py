"""Record mmcv 2.1's multi-scale deformable attention (values and gradients) on fixed inputs.

Run by hand in the peer venv built by ../shared/peer/build_mmdet_peer.sh (never by CI):

    ~/.cache/codetr-peer/venv/bin/python tests/peer/record_mmcv_msda.py

mmcv runs its compiled kernel only on GPUs; on the CPU its `MultiScaleDeformableAttention` module calls
`multi_scale_deformable_attn_pytorch`, which is what mmdet 3.3 trains and evaluates with there, so that is the
function recorded. Writes tests/fixtures/peer/mmcv_msda.pt, one entry per case:
  - "shapes" [L, 2] (H_l, W_l); "value" [B, Lv, H, Dh]; "locations" [B, Lq, H, L, P, 2]; "weights"
    [B, Lq, H, L, P]; "upstream" [B, Lq, H * Dh] (the gradient fed to backward);
  - "out" [B, Lq, H * Dh] and "grad_value", "grad_locations", "grad_weights".
Cases: float64 and float32; locations drawn over [-0.3, 1.3] (points off the maps read zeros); query 0's points
moved exactly onto pixel centres (where floor() changes, so the bilinear corners switch), query 1's half-way
between centres (location 0 among them: the map's edge); a 1x1 level.
"""
from __future__ import annotations

from pathlib import Path

import torch
from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "peer" / "mmcv_msda.pt"
SHAPES = [(6, 9), (3, 5), (2, 3), (1, 1)]


def make_case(dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch, queries, heads, head_dim, points = 2, 7, 2, 4, 3
    levels = len(SHAPES)
    num_values = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, num_values, heads, head_dim, generator=g, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    sizes = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)  # (W, H) per level
    # query 0: every point on a pixel centre; query 1: half-way between two centres
    pixel = torch.randint(0, 9, (batch, heads, levels, points, 2), generator=g).double()
    pixel = torch.minimum(pixel, sizes[:, None] - 1)
    locations[:, 0] = (pixel + 0.5) / sizes[:, None]
    locations[:, 1] = pixel / sizes[:, None]
    weights = torch.randn(batch, queries, heads, levels * points, generator=g, dtype=torch.float64).softmax(-1)
    weights = weights.view(batch, queries, heads, levels, points)
    upstream = torch.randn(batch, queries, heads * head_dim, generator=g, dtype=torch.float64)
    value, locations, weights, upstream = (t.to(dtype) for t in (value, locations, weights, upstream))

    inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    out = multi_scale_deformable_attn_pytorch(inputs[0], torch.tensor(SHAPES), inputs[1], inputs[2])
    grads = torch.autograd.grad(out, inputs, upstream)
    return {"shapes": torch.tensor(SHAPES), "value": value, "locations": locations, "weights": weights,
            "upstream": upstream, "out": out.detach(), "grad_value": grads[0], "grad_locations": grads[1],
            "grad_weights": grads[2]}


def main() -> None:
    import mmcv

    cases = {"float64": make_case(torch.float64, 0), "float32": make_case(torch.float32, 1)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"source": f"mmcv {mmcv.__version__} multi_scale_deformable_attn_pytorch", "cases": cases}, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
