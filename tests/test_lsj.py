"""Large-scale jitter (Co-DINO's LSJ configs): fixed square inputs whose grey padding counts as image, and
boxes that map back to the original image through the padded square's extent."""
import torch
from PIL import Image

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.data.collate import collate
from codetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, LSJ_PAD_VALUE, make_lsj_transforms


def sample():
    image = Image.new("RGB", (300, 200), (10, 200, 30))
    target = {"boxes": torch.tensor([[10.0, 20.0, 110.0, 120.0], [0.0, 0.0, 300.0, 200.0]]),
              "labels": torch.tensor([1, 2]), "orig_size": torch.tensor([200, 300]), "size": torch.tensor([200, 300])}
    return image, target


def test_test_resize_pads_with_grey_and_boxes_map_back_through_the_extent():
    image, target = sample()
    tensor, out = make_lsj_transforms(False, 128)(image, target)
    assert tensor.shape == (3, 128, 128) and out["size"].tolist() == [128, 128]
    # 300 x 200 fits 128 as 128 x 85 (scale 128 / 300); rows 85.. are LSJ's grey, normalised
    grey = (LSJ_PAD_VALUE / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(tensor[:, 100, 5], grey, rtol=0, atol=1e-6)
    assert collate([(tensor, out)]).masks.sum() == 0  # the padding counts as image
    extent = out["box_extent"]  # original pixels covered by the square: (128 * 200 / 85, 128 * 300 / 128)
    torch.testing.assert_close(extent, torch.tensor([128 * 200 / 85, 300.0]))
    back = box_cxcywh_to_xyxy(out["boxes"]) * extent.flip(0).repeat(2)
    torch.testing.assert_close(back, target["boxes"], rtol=0, atol=0.5)  # within the rounding of 85.33 rows


def test_train_jitter_gives_squares_with_boxes_inside():
    image, target = sample()
    torch.manual_seed(0)
    for _ in range(20):
        tensor, out = make_lsj_transforms(True, 128, (0.1, 2.0))(image, target)
        assert tensor.shape == (3, 128, 128) and out["size"].tolist() == [128, 128]
        boxes = box_cxcywh_to_xyxy(out["boxes"])
        assert ((boxes >= -1e-6) & (boxes <= 1 + 1e-6)).all()
        assert len(out["labels"]) == len(boxes) and set(out["labels"].tolist()) <= {1, 2}


def test_train_jitter_at_a_fixed_scale_by_hand():
    """scale_range (0.5, 0.5) on a 300 x 200 image and size 128: the image must fit 64 x 64, so it becomes
    64 x 43 (scale 64 / 300), smaller than the window: no crop; the box [10, 20, 110, 120] scales by
    (64 / 300, 43 / 200) to
    [2.13, 4.3, 23.47, 25.8] px, mirrored on a flip to [40.53, 4.3, 61.87, 25.8]; normalised by 128."""
    image, target = sample()
    scale = 64 / 300
    unflipped = torch.tensor([10.0, 20.0, 110.0, 120.0]) * torch.tensor([64 / 300, 43 / 200] * 2)
    flipped = torch.stack((64 - unflipped[2], unflipped[1], 64 - unflipped[0], unflipped[3]))
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        tensor, out = make_lsj_transforms(True, 128, (0.5, 0.5))(image, target)
        box = box_cxcywh_to_xyxy(out["boxes"][0]) * 128
        was_flipped = bool(torch.allclose(box, flipped, atol=1e-3))
        assert was_flipped or torch.allclose(box, unflipped, atol=1e-3), box
        seen.add(was_flipped)
        assert out["labels"].tolist() == [1, 2]
        grey = (LSJ_PAD_VALUE / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
        torch.testing.assert_close(tensor[:, 43:, :].mean((1, 2)), grey, rtol=0, atol=1e-5)  # rows below 43 px
        torch.testing.assert_close(tensor[:, :, 64:].mean((1, 2)), grey, rtol=0, atol=1e-5)  # columns right of 64
    assert seen == {True, False}  # both outcomes of the 0.5 flip occurred
    assert round(200 * scale) == 43
