"""codetr's SwinBackbone against mmdetection 3.3's SwinTransformer, through codetr/convert/swin_keys.py.

The fixture (tests/fixtures/peer/swin.pt) was recorded from mmdet 3.3 by tests/peer/record_swin.py:
small Swin backbones (embed 16, two blocks per stage) with window 7 on a batch of two 99 x 78 images and
window 12 on one 130 x 100 image, so that the patch embedding, patch merging and the windows all pad and
the last stages are smaller than one window (mmdet shifts and masks them anyway; torchvision would not).
A third case fills the window-7 model through the original Swin / Sense-X names and loads it with
mmdet's own swin_converter. Weights and images are regenerated from their seeds (the recorded per-tensor
sums are checked first); codetr's backbone is built from the architecture read off the converted state
dict and loaded strictly.

Tolerance (float32, both on the CPU): atol 1e-5 + rtol 1e-4 per output map, on maps of std ~1. Measured
when recording (max abs error per level): w7 0 / 1.6e-6 / 2.1e-6 / 3.1e-6, w12 (levels 1..3) 1.4e-6 /
1.9e-6 / 3.1e-6, w7_sensex 0 / 2.4e-6 / 2.4e-6 / 3.0e-6. The cases do tell the differences apart:
torchvision's own attention forward (no shift on one-window maps) is off by 1.1 / 1.9 (w7) and 1.5 / 1.6
(w12) on the last two levels; loading mmdet's patch merging without the permutation, by 5 from level 1.
"""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention

from codetr.convert.swin_keys import (
    convert_mmdet_swin, convert_sensex_swin, recomputed_keys, swin_architecture, unfold_to_concat,
)
from codetr.errors import CheckpointError
from codetr.models.swin import SWIN_SIZES, SwinBackbone, relative_position_index
from tests.test_peer_deformable_detr import hashed_uniform

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "peer" / "swin.pt"
CASES = ["w7", "w12", "w7_sensex"]
ATOL, RTOL = 1e-5, 1e-4
CONVERTERS = {"mmdet": convert_mmdet_swin, "sensex": convert_sensex_swin}


@functools.cache
def load_fixture() -> dict:
    """The recorded fixture; a missing file fails the tests (fixtures are committed)."""
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} is missing: run tests/peer/record_swin.py in the peer venv")
    return torch.load(FIXTURE, weights_only=True)


def foreign_state(name: str) -> dict[str, Tensor]:
    """A fresh (shallow) copy of case `name`'s foreign state dict, which tests may edit."""
    return dict(_regenerated_state(name))


@functools.cache
def _regenerated_state(name: str) -> dict[str, Tensor]:
    """The recorded (prefixed) foreign state dict, regenerated; relative_position_index from the record."""
    case = load_fixture()["cases"][name]
    index = case["relative_position_index"].to(torch.int64)
    state: dict[str, Tensor] = {}
    for r in case["weights"]:
        if r["key"].endswith("relative_position_index"):
            state[r["key"]] = index.clone()
        elif r["alias_of"] is not None:
            state[r["key"]] = state[r["alias_of"]]
        else:
            numel = int(torch.Size(r["shape"]).numel())
            state[r["key"]] = (hashed_uniform(numel, r["seed"]) * r["scale"] + r["shift"]).view(r["shape"])
        assert float(state[r["key"]].double().sum()) == pytest.approx(r["sum"], rel=1e-9, abs=1e-6), r["key"]
    return state


def case_image(case: dict) -> Tensor:
    spec = case["image"]
    image = (hashed_uniform(int(torch.Size(spec["shape"]).numel()), spec["seed"]) * spec["scale"]).view(spec["shape"])
    assert float(image.double().sum()) == pytest.approx(spec["sum"], rel=1e-9, abs=1e-6)
    return image


@pytest.mark.parametrize("name", CASES)
def test_outputs_equal_mmdet(name: str) -> None:
    case = load_fixture()["cases"][name]
    converted = CONVERTERS[case["layout"]](foreign_state(name), prefix=case["prefix"])
    arch = swin_architecture(converted)
    config = case["config"]
    assert arch == dict(embed_dim=config["embed_dims"], depths=tuple(config["depths"]),
                        num_heads=tuple(config["num_heads"]), window_size=config["window_size"],
                        mlp_ratio=float(config["mlp_ratio"]), out_indices=tuple(config["out_indices"]), patch_size=4)
    model = SwinBackbone(**arch, drop_path_rate=0.0).eval()
    model.load_state_dict(converted, strict=True)
    with torch.no_grad():
        outputs = model(case_image(case))
    expected = case["outputs"]
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    assert model.out_channels == [e.shape[1] for e in expected]
    errors = [float((o - e).abs().max()) for o, e in zip(outputs, expected)]
    print(f"{name}: max abs error per level {[f'{e:.1e}' for e in errors]}")
    for level, (o, e) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(o, e, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} level {level}: {m}")


def test_swin_l_layout_converts_completely() -> None:
    """The released Co-DINO Swin-L backbone's mmdet layout: every key placed, every shape ours."""
    state = {}
    for r in load_fixture()["swin_l_layout"]:
        if r["key"].endswith("relative_position_index"):  # values matter: the converter checks them
            state[r["key"]] = relative_position_index(12).view(r["shape"])
        else:
            state[r["key"]] = torch.empty(r["shape"], device="meta")
    converted = convert_mmdet_swin(state)
    size = {k: v for k, v in SWIN_SIZES["swin_l"].items() if k != "drop_path_rate"}
    assert swin_architecture(converted) == dict(size, mlp_ratio=4.0, out_indices=(0, 1, 2, 3), patch_size=4)
    with torch.device("meta"):
        ours = SwinBackbone(**SWIN_SIZES["swin_l"]).state_dict()
    assert converted.keys() == ours.keys()
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in ours.items()}
    assert len(recomputed_keys(ours)) == sum(SWIN_SIZES["swin_l"]["depths"])


def test_unmapped_key_is_named() -> None:
    state = foreign_state("w7")
    state["backbone.stages.0.blocks.0.attn.w_msa.extra"] = torch.zeros(1)
    state["neck.convs.0.weight"] = torch.zeros(1)  # outside the prefix: not the backbone's business
    with pytest.raises(CheckpointError, match=r"1 keys .*backbone\.stages\.0\.blocks\.0\.attn\.w_msa\.extra$"):
        convert_mmdet_swin(state)


def test_wrong_shape_and_missing_key_are_named() -> None:
    state = foreign_state("w7")
    state["backbone.stages.1.blocks.1.ffn.layers.1.weight"] = torch.zeros(32, 64)
    del state["backbone.norm2.bias"]
    with pytest.raises(CheckpointError) as error:
        convert_mmdet_swin(state)
    message = str(error.value)
    assert "\n" not in message
    assert "stages.1.1.mlp.3.weight [32, 64] (expected [32, 128])" in message
    assert "out_norms.2.bias missing" in message


def test_foreign_relative_position_index_is_checked() -> None:
    state = foreign_state("w7")
    state["backbone.stages.2.blocks.1.attn.w_msa.relative_position_index"] = torch.zeros(49, 49, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"stages\.2\.1\.attn\.relative_position_index \[49, 49\] is not"):
        convert_mmdet_swin(state)


def test_sensex_names_are_not_mmdet_names() -> None:
    with pytest.raises(CheckpointError, match=r"mmdet swin: \d+ keys have no codetr counterpart: backbone\.patch_embed\.proj\."):
        convert_mmdet_swin(foreign_state("w7_sensex"))


def test_unfold_to_concat_matches_torchvision_patch_merging() -> None:
    """mmdet merges 2x2 patches with nn.Unfold (channel-major 4C); torchvision concatenates neighbours
    (neighbour-major): mmdet-layout merge weights, permuted, give torchvision's merge the same output."""
    torch.manual_seed(0)
    channels = 3
    x = torch.randn(2, 5, 7, channels)  # [B, H, W, C], odd sizes: both pad at the bottom / right
    norm_weight, norm_bias = torch.rand(4 * channels) + 0.5, torch.rand(4 * channels) - 0.5  # mmdet layout
    reduction = torch.randn(2 * channels, 4 * channels)
    padded = nn.functional.pad(x, (0, 0, 0, 1, 0, 1)).permute(0, 3, 1, 2)  # [B, C, 6, 8]
    unfolded = nn.Unfold(kernel_size=2, stride=2)(padded).transpose(1, 2)  # [B, 3 * 4, 4C], mmdet's merge
    expected = nn.functional.linear(nn.functional.layer_norm(unfolded, (4 * channels,), norm_weight, norm_bias),
                                    reduction)
    merge = PatchMerging(channels)
    merge.load_state_dict({"norm.weight": unfold_to_concat(norm_weight), "norm.bias": unfold_to_concat(norm_bias),
                           "reduction.weight": unfold_to_concat(reduction)})
    with torch.no_grad():
        torch.testing.assert_close(merge(x).flatten(1, 2), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("window", [7, 12])
def test_relative_position_index_equals_torchvision(window: int) -> None:
    reference = ShiftedWindowAttention(4, [window, window], [0, 0], num_heads=1)
    assert torch.equal(relative_position_index(window), reference.relative_position_index)
