"""Our RoIAlign (two matrix products) against torchvision's kernel: values and gradients."""
import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

from codetr.models.co_detr.roi_align import MAX_DENSE_CELLS, roi_align, separable_roi_align


def random_rois(count: int, images: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """[count, 5] RoIs over 3 images of ~136 x 104 px: some partly or wholly outside the map, some
    empty (zero width or height), some tiny, some larger than the map."""
    image = torch.randint(0, images, (count, 1), generator=generator).to(dtype)
    corner = torch.rand(count, 2, generator=generator, dtype=dtype) * 180 - 30
    size = torch.rand(count, 2, generator=generator, dtype=dtype) * 140
    size[:4, 0] = 0.0  # empty
    size[4:8] = 0.3  # smaller than a cell
    size[8:10] = 400.0  # larger than the map
    return torch.cat((image, corner, corner + size), 1)


@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, True), (0, False), (3, False)])
def test_separable_roi_align_equals_torchvision(sampling_ratio, aligned):
    """float64: values and the gradient w.r.t. the features to 1e-12 (the same samples, summed in
    another order)."""
    generator = torch.Generator().manual_seed(sampling_ratio + 10 * aligned)
    features = torch.randn(3, 5, 13, 17, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(80, 3, generator)
    ours = separable_roi_align(features, rois, 7, 1 / 8, sampling_ratio, aligned)
    reference = torchvision_roi_align(features, rois, 7, 1 / 8, sampling_ratio, aligned)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    upstream = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), features)
    (reference_grad,) = torch.autograd.grad((reference * upstream).sum(), features)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=0, atol=1e-12)


def test_float32_one_by_one_map_and_no_rois():
    """float32 to 1e-5; a 1 x 1 map (every sample clamps to its one cell); zero RoIs give [0, C, S, S]."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 9, 11, generator=generator)
    rois = random_rois(40, 2, generator, torch.float32)
    torch.testing.assert_close(separable_roi_align(features, rois, 7, 0.25), torchvision_roi_align(features, rois, 7, 0.25, 0, True),
                               rtol=0, atol=1e-5)
    single = torch.randn(1, 3, 1, 1, generator=generator)
    one = torch.tensor([[0.0, -4.0, -4.0, 12.0, 12.0]])
    torch.testing.assert_close(separable_roi_align(single, one, 2, 1.0), torchvision_roi_align(single, one, 2, 1.0, 0, True),
                               rtol=0, atol=1e-6)
    assert separable_roi_align(features, rois[:0], 7, 0.25).shape == (0, 4, 7, 7)


def test_autocast_keeps_the_features_precision():
    """Under CPU bf16 autocast, like torchvision's kernel: float32 in, float32 out, to 1e-5."""
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 6, 10, 12, generator=generator)
    rois = random_rois(30, 2, generator, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, reference = roi_align(features, rois, 7, 0.25), torchvision_roi_align(features, rois, 7, 0.25, 0, True)
    assert ours.dtype == reference.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_large_maps_use_the_torchvision_kernel():
    generator = torch.Generator().manual_seed(1)
    side = int(MAX_DENSE_CELLS**0.5) + 1
    features = torch.randn(1, 2, side, side, generator=generator)
    rois = torch.tensor([[0.0, 3.0, 5.0, 40.0, 30.0]])
    assert torch.equal(roi_align(features, rois, 7, 1.0), torchvision_roi_align(features, rois, 7, 1.0, 0, True))
