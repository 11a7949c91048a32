"""Multi-scale deformable attention, both implementations ("grid_sample", "sparse"), against a plain per-point
bilinear sampling loop, mmcv 2.1's recorded values and gradients, and each other."""

import math

import pytest
import torch
from pathlib import Path

from torch import nn

from codetr.models.ms_deform_attn import (
    MSDeformAttn,
    multi_scale_deformable_attention,
    resolve_attention_impl,
    sampling_locations_from_offsets,
    use_attention_impl,
)

IMPLS = ("grid_sample", "sparse")
MMCV_FIXTURE = Path(__file__).parent / "fixtures" / "peer" / "mmcv_msda.pt"

SHAPES = [(4, 5), (2, 3)]  # (H_l, W_l) per level


def _reference_msda(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
    """Explicit loops: for every point, the four neighbouring pixel centres, zero outside the map."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(levels)]
    outputs = []
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                acc = value.new_zeros(head_dim)
                for lvl, (height, width) in enumerate(shapes):
                    for p in range(points):
                        # pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H)
                        x = locations[b, q, h, lvl, p, 0] * width - 0.5
                        y = locations[b, q, h, lvl, p, 1] * height - 0.5
                        x0, y0 = math.floor(x.item()), math.floor(y.item())
                        fx, fy = x - x0, y - y0
                        corners = (
                            (x0, y0, (1 - fx) * (1 - fy)),
                            (x0 + 1, y0, fx * (1 - fy)),
                            (x0, y0 + 1, (1 - fx) * fy),
                            (x0 + 1, y0 + 1, fx * fy),
                        )
                        for xi, yi, bilinear in corners:
                            if 0 <= xi < width and 0 <= yi < height:
                                pixel = value[b, starts[lvl] + yi * width + xi, h]
                                acc = acc + weights[b, q, h, lvl, p] * bilinear * pixel
                outputs.append(acc)
    return torch.stack(outputs).view(batch, queries, heads * head_dim)


def _random_inputs(seed: int, queries: int = 3, heads: int = 2, points: int = 2, head_dim: int = 3):
    g = torch.Generator().manual_seed(seed)
    num_values = sum(h * w for h, w in SHAPES)
    value = torch.randn(2, num_values, heads, head_dim, generator=g, dtype=torch.float64)
    # locations partly outside [0, 1] to exercise the zero padding
    locations = torch.rand(2, queries, heads, len(SHAPES), points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(2, queries, heads, len(SHAPES), points, generator=g, dtype=torch.float64)
    return value, locations, weights


@pytest.mark.parametrize("impl", IMPLS)
def test_functional_matches_loop_values_and_gradients(impl: str) -> None:
    value, locations, weights = _random_inputs(0)
    spatial_shapes = torch.tensor(SHAPES)
    inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    out = multi_scale_deformable_attention(inputs[0], spatial_shapes, inputs[1], inputs[2], impl=impl)
    ref = _reference_msda(ref_inputs[0], SHAPES, ref_inputs[1], ref_inputs[2])
    assert out.shape == (2, 3, 2 * 3)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)  # float64
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, ref_inputs, upstream)
    for name, grad, ref_grad in zip(("value", "locations", "weights"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-8, rtol=0, msg=f"gradient w.r.t. {name}")
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0  # the comparison is not vacuous


@pytest.mark.parametrize("impl", IMPLS)
def test_functional_gradcheck_double(impl: str) -> None:
    value, locations, weights = _random_inputs(1, queries=2, heads=2, points=2, head_dim=2)
    spatial_shapes = torch.tensor(SHAPES)
    inputs = tuple(t.requires_grad_(True) for t in (value, locations, weights))
    level_start_index = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]])
    assert torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_attention(v, spatial_shapes, loc, w, level_start_index, impl), inputs
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, tolerance", [("float64", 1e-12), ("float32", 2e-5)])
def test_functional_matches_recorded_mmcv(impl: str, case: str, tolerance: float) -> None:
    """mmcv 2.1's multi_scale_deformable_attn_pytorch (tests/peer/record_mmcv_msda.py): points off the maps, on
    pixel centres and half-way between them, a 1x1 level; values and all three gradients."""
    record = torch.load(MMCV_FIXTURE, weights_only=True)["cases"][case]
    inputs = [record[k].clone().requires_grad_(True) for k in ("value", "locations", "weights")]
    out = multi_scale_deformable_attention(inputs[0], record["shapes"], inputs[1], inputs[2], impl=impl)
    scale = record["out"].abs().max()
    torch.testing.assert_close(out, record["out"], atol=tolerance * scale.item(), rtol=0)
    grads = torch.autograd.grad(out, inputs, record["upstream"])
    for name, grad in zip(("value", "locations", "weights"), grads):
        expected = record[f"grad_{name}"]
        # tolerance relative to the largest entry: location gradients are scaled by the map widths
        torch.testing.assert_close(grad, expected, atol=tolerance * expected.abs().max().item(), rtol=0,
                                   msg=lambda m: f"gradient w.r.t. {name}: {m}")


def test_sparse_equals_grid_sample_at_encoder_like_scale() -> None:
    """float32, 4 levels, 8 heads, points spread around every query; only the gradients autograd asks for."""
    g = torch.Generator().manual_seed(3)
    shapes = [(20, 30), (10, 15), (5, 8), (3, 4)]
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(2, num_values, 8, 32, generator=g)
    centres = torch.rand(2, num_values, 1, 1, 1, 2, generator=g)
    locations = centres + 0.05 * torch.randn(2, num_values, 8, 4, 4, 2, generator=g)
    weights = torch.rand(2, num_values, 8, 16, generator=g).softmax(-1).view(2, num_values, 8, 4, 4)
    upstream = torch.randn(2, num_values, 256, generator=g)
    results = {}
    for impl in IMPLS:
        inputs = [value.clone().requires_grad_(True), locations.clone(), weights.clone().requires_grad_(True)]
        out = multi_scale_deformable_attention(inputs[0], torch.tensor(shapes), inputs[1], inputs[2], impl=impl)
        results[impl] = (out, *torch.autograd.grad(out, (inputs[0], inputs[2]), upstream))
    for name, ours, theirs in zip(("out", "grad value", "grad weights"), results["sparse"], results["grid_sample"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5 * theirs.abs().max().item(), rtol=0, msg=lambda m: f"{name}: {m}")


def test_sparse_keeps_only_its_inputs_for_backward() -> None:
    """The sparse implementation saves value, locations and weights; grid_sample under autograd also keeps
    every level's [B*H, Dh, Lq, P] samples (here several times the inputs)."""
    value, locations, weights = _random_inputs(4, queries=40, heads=2, points=4, head_dim=8)
    inputs_bytes = sum(t.numel() * t.element_size() for t in (value, locations, weights))
    saved = {}
    for impl in IMPLS:
        tensors = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: tensors.append(t) or t, lambda t: t):
            multi_scale_deformable_attention(*(t.clone().requires_grad_(True) for t in (value,)), torch.tensor(SHAPES),
                                             locations.clone().requires_grad_(True),
                                             weights.clone().requires_grad_(True), impl=impl)
        saved[impl] = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    assert saved["sparse"] == inputs_bytes
    assert saved["grid_sample"] > 2 * inputs_bytes


def test_auto_picks_sparse_for_large_cpu_calls_and_names_are_checked() -> None:
    assert resolve_attention_impl("auto", torch.device("cpu"), num_points=2_600_000) == "sparse"  # R50 encoder
    assert resolve_attention_impl("auto", torch.device("cpu"), num_points=400_000) == "grid_sample"  # tiny
    assert resolve_attention_impl("auto", torch.device("cuda"), num_points=2_600_000) == "grid_sample"
    assert resolve_attention_impl("sparse", torch.device("cpu"), num_points=10) == "sparse"
    with pytest.raises(ValueError, match="grid_sample, sparse"):
        resolve_attention_impl("triton", torch.device("cpu"))
    model = nn.Sequential(MSDeformAttn(16, 2, 2, 2), MSDeformAttn(16, 2, 2, 2))
    assert [m.impl for m in use_attention_impl(model, "grid_sample")] == ["grid_sample", "grid_sample"]


def test_functional_rejects_inconsistent_shapes() -> None:
    value, locations, weights = _random_inputs(2)
    with pytest.raises(ValueError, match="level_start_index"):
        multi_scale_deformable_attention(value, torch.tensor(SHAPES), locations, weights, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="positions"):
        multi_scale_deformable_attention(value[:, 1:], torch.tensor(SHAPES), locations, weights)


def test_sampling_locations_2d_and_4d_hand_checked() -> None:
    spatial_shapes = torch.tensor([[4, 8]])  # H = 4, W = 8
    offsets = torch.tensor([2.0, -1.0]).view(1, 1, 1, 1, 1, 2).repeat(1, 1, 1, 1, 2, 1)  # P = 2
    # 2-d: ref + offset / (W, H) = (0.5 + 2/8, 0.25 - 1/4)
    loc = sampling_locations_from_offsets(torch.tensor([0.5, 0.25]).view(1, 1, 1, 2), offsets, spatial_shapes)
    torch.testing.assert_close(loc[0, 0, 0, 0, 0], torch.tensor([0.75, 0.0]), atol=1e-7, rtol=0)
    # 4-d: ref_xy + offset / P * ref_wh / 2 = (0.5 + 2/2*0.2/2, 0.25 - 1/2*0.4/2)
    box = torch.tensor([0.5, 0.25, 0.2, 0.4]).view(1, 1, 1, 4)
    loc = sampling_locations_from_offsets(box, offsets, spatial_shapes)
    torch.testing.assert_close(loc[0, 0, 0, 0, 1], torch.tensor([0.6, 0.15]), atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="reference_points"):
        sampling_locations_from_offsets(torch.zeros(1, 1, 1, 3), offsets, spatial_shapes)


@pytest.mark.parametrize(
    "reference, expected_pixel",
    [
        # 2-d ref (0.5, 0.25) + offset (1, 0.5) / (8, 4) = (0.625, 0.375) -> pixel (0.625*8-0.5, 0.375*4-0.5)
        ([0.5, 0.25], [4.5, 1.0]),
        # 4-d ref: (0.5, 0.5) + (1, 0.5) / P(=1) * (0.5, 0.5) / 2 = (0.75, 0.625) -> pixel (5.5, 2.0)
        ([0.5, 0.5, 0.5, 0.5], [5.5, 2.0]),
    ],
)
@pytest.mark.parametrize("impl", IMPLS)
def test_module_one_point_hand_checked(reference: list[float], expected_pixel: list[float], impl: str) -> None:
    # One head, level and point; identity projections; a value map whose channels are the pixel
    # column and row, so bilinear sampling returns the (fractional) pixel coordinates themselves.
    attn = MSDeformAttn(embed_dim=2, num_heads=1, num_levels=1, num_points=1, impl=impl).double()
    with torch.no_grad():
        for proj in (attn.value_proj, attn.output_proj):
            proj.weight.copy_(torch.eye(2))
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.5]))
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(8.0), indexing="ij")
    value = torch.stack((cols, rows), dim=-1).view(1, 32, 2).double()
    ref = torch.tensor(reference, dtype=torch.float64).view(1, 1, 1, -1)
    out = attn(torch.zeros(1, 1, 2, dtype=torch.float64), ref, value, torch.tensor([[4, 8]]), torch.tensor([0]))
    torch.testing.assert_close(out.view(2), torch.tensor(expected_pixel, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_module_ignores_padded_values(impl: str) -> None:
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=8, num_heads=2, num_levels=2, num_points=3, impl=impl)
    nn.init.normal_(attn.sampling_offsets.weight, std=1.0)  # spread the points over the maps
    nn.init.normal_(attn.attention_weights.weight, std=1.0)
    spatial_shapes = torch.tensor(SHAPES)
    num_values = sum(h * w for h, w in SHAPES)
    # image 0 is padded on the right: last 2 columns of level 0, last column of level 1
    mask = torch.zeros(2, num_values, dtype=torch.bool)
    mask[0, :20] = torch.zeros(4, 5, dtype=torch.bool).index_fill_(1, torch.tensor([3, 4]), True).flatten()
    mask[0, 20:] = torch.zeros(2, 3, dtype=torch.bool).index_fill_(1, torch.tensor([2]), True).flatten()
    query = torch.randn(2, 6, 8)
    reference = torch.rand(2, 6, 2, 2)
    value = torch.randn(2, num_values, 8)
    changed = value.clone()
    changed[mask] = torch.randn(int(mask.sum()), 8) * 100
    out = attn(query, reference, value, spatial_shapes, value_padding_mask=mask)
    out_changed = attn(query, reference, changed, spatial_shapes, value_padding_mask=mask)
    torch.testing.assert_close(out, out_changed, atol=1e-6, rtol=0)  # float32, values up to ~100
    # without the mask the change is visible, so the points do reach the padded area
    unmasked = attn(query, reference, changed, spatial_shapes)
    assert (unmasked - attn(query, reference, value, spatial_shapes)).abs().max() > 1e-2


def test_module_init_and_argument_checks() -> None:
    attn = MSDeformAttn(embed_dim=16, num_heads=8, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.detach().view(8, 2, 3, 2)  # [H, L, P, (dx, dy)]
    torch.testing.assert_close(bias[0, 1, 0], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)  # head 0: +x
    torch.testing.assert_close(bias[1, 0, 2], torch.tensor([3.0, 3.0]), atol=1e-6, rtol=0)  # 45 deg, point 3
    torch.testing.assert_close(bias[6, 1, 1], torch.tensor([0.0, -2.0]), atol=1e-6, rtol=0)  # 270 deg
    assert attn.sampling_offsets.weight.abs().sum() == 0 and attn.attention_weights.weight.abs().sum() == 0
    assert attn.attention_weights.bias.abs().sum() == 0 and attn.value_proj.bias.abs().sum() == 0
    with pytest.raises(ValueError, match=r"embed_dim \(10\).*num_heads \(4\)"):
        MSDeformAttn(embed_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="levels"):
        attn(torch.zeros(1, 1, 16), torch.zeros(1, 1, 3, 2), torch.zeros(1, 26, 16), torch.tensor(SHAPES))
