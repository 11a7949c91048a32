"""Head-level equivalence with mmdetection 3.3's own heads: Co-DETR's Faster-RCNN branch (RPNHead +
StandardRoIHead with Shared2FCBBoxHead), GFLHead and PAAHead.

The fixtures tests/fixtures/peer/head2_{faster_rcnn,gfl,paa}.pt were recorded by
tests/peer/record_heads_rcnn_gfl_paa.py in the mmdet 3.3 / mmcv 2.1 peer venv: the mmdet head's random
weights, fixed random maps at strides 8..128 of a padded batch of two images of different valid sizes,
ground truth, mmdet's loss terms and its assignment. Here codetr's head gets the converted weights
(codetr.convert.mmdet_heads_rcnn_gfl_paa) and the same inputs, and must give
  - every raw loss term equal to mmdet's term divided by mmdet's loss_weight, within float32 tolerance
    LOSS_ATOL = 1e-5, LOSS_RTOL = 1e-4 (the two compute the same sums in a different order);
  - the same assignment: the same positive anchors / sampled RoIs, each with the same ground-truth box and label;
    for the Faster-RCNN branch also the same proposals and the same RoI features (Co-DETR's content feature);
on the recorded batch and on the same batch with image 1 left without ground truth.
mmdet's random samplers (RPN: 256 anchors, RoI head: 512 RoIs) draw with torch.randperm; the recorder kept
every draw and the tests replay them in order, checking that codetr asks for a permutation of the same
length at the same point.

Settings are Co-DETR's released ones for the RPN / RoI head and mmdet's gfl / paa_r50_fpn_1x ones (one
stacked conv) for GFL / PAA: codetr's defaults, so no option is set. The peer's RoI head is mmdet's
StandardRoIHead: Co-DETR's CoStandardRoIHead (not in mmdet's pip package) samples and computes its losses
the same way and only adds the sampled RoIs as positive-query inputs, truncated to the batch's smallest
per-image count; codetr keeps each image's own count by design (see faster_rcnn.py), equal here (512 each).
mmdet's PAA score voting only changes inference (an auxiliary head's own, tests/test_aux_branch_eval.py).
A missing fixture is a failure, not a skip.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import codetr.models.co_detr.heads.roi_head as roi_module
import codetr.models.co_detr.heads.rpn as rpn_module
from codetr.convert.common import ConversionError
from codetr.convert.mmdet_heads_rcnn_gfl_paa import convert_head
from codetr.models.co_detr.heads.common import valid_anchor_masks
from codetr.models.co_detr.heads.faster_rcnn import FasterRCNNHead
from codetr.models.co_detr.heads.gfl import GFLHead
from codetr.models.co_detr.heads.paa import PAAHead
from codetr.models.co_detr.types import AuxInputs

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "peer"
LOSS_ATOL, LOSS_RTOL = 1e-5, 1e-4
BOX_ATOL, BOX_RTOL = 1e-3, 1e-5  # pixels: decoded boxes of a few hundred px in float32


def load_fixture(kind: str) -> dict:
    path = FIXTURES / f"head2_{kind}.pt"
    assert path.is_file(), f"missing fixture {path}: run tests/peer/record_heads_rcnn_gfl_paa.py in the peer venv"
    return torch.load(path, weights_only=True)


CASES = ["main", "image1_without_gt"]


def load_case(kind: str, case: str) -> dict:
    """The fixture of `kind` with "inputs", "losses", "assignment" and "randperm" of one recorded case:
    "main" (both images with ground truth) or "image1_without_gt" (same maps, image 1 without any GT)."""
    fixture = load_fixture(kind)
    if case == "main":
        return fixture
    variant = fixture[case]
    inputs = dict(fixture["inputs"], gt_boxes=variant["gt_boxes"], gt_labels=variant["gt_labels"])
    return dict(fixture, inputs=inputs, losses=variant["losses"], assignment=variant["assignment"],
                randperm=variant["randperm"])


def aux_inputs(fixture: dict) -> AuxInputs:
    inputs = fixture["inputs"]
    return AuxInputs(maps=[m.clone() for m in inputs["maps"]], masks=list(inputs["masks"]),
                     strides=list(inputs["strides"]), image_sizes=inputs["image_sizes"].clone(),
                     gt_boxes=list(inputs["gt_boxes"]), gt_labels=list(inputs["gt_labels"]))


class RandpermReplay:
    """Stands in for torch.randperm: returns mmdet's recorded permutations in order, checking each length."""

    def __init__(self, recorded: list[torch.Tensor]) -> None:
        self.recorded = list(recorded)
        self.used = 0

    def __call__(self, n: int, *args, **kwargs) -> torch.Tensor:
        assert self.used < len(self.recorded), f"codetr drew a permutation #{self.used + 1}; mmdet drew {len(self.recorded)}"
        perm = self.recorded[self.used]
        assert len(perm) == n, f"permutation #{self.used + 1}: codetr asked for {n} items, mmdet for {len(perm)}"
        self.used += 1
        return perm.long()


@pytest.fixture
def replay(monkeypatch):
    def install(fixture: dict) -> RandpermReplay:
        player = RandpermReplay(fixture["randperm"])
        monkeypatch.setattr(torch, "randperm", player)
        return player
    return install


def spy(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that keeps every result; returns that list."""
    results = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        results.append(result)
        return result

    monkeypatch.setattr(module, name, wrapped)
    return results


def assert_losses(fixture: dict, losses: dict[str, torch.Tensor]) -> None:
    """codetr's raw terms against mmdet's weighted terms / mmdet's loss_weight."""
    assert set(losses) == set(fixture["losses"])
    for name, value in losses.items():
        expected = fixture["losses"][name] / fixture["loss_weights"][name]
        torch.testing.assert_close(value.detach().float(), expected.float(), atol=LOSS_ATOL, rtol=LOSS_RTOL,
                                   msg=lambda m, n=name: f"{n}: {m}")


def gt_index_of(target_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
    """[P] index of the GT box each target box [P, 4] is (exactly one, as the targets are copies)."""
    if len(target_boxes) == 0:
        return torch.zeros(0, dtype=torch.long)
    same = (target_boxes[:, None, :] == gt_boxes[None, :, :].to(target_boxes.dtype)).all(-1)  # [P, N]
    assert bool((same.sum(1) == 1).all()), "a target box is not exactly one GT box"
    return same.float().argmax(1)


def assert_candidates(candidates, gt_inds_per_image: list[torch.Tensor], fixture: dict) -> None:
    """Candidates over the valid anchors against mmdet's gt_inds (0 negative, k >= 1 -> GT k - 1)."""
    inputs = fixture["inputs"]
    for image, (cand, gt_inds) in enumerate(zip(candidates, gt_inds_per_image)):
        assert len(cand.labels) == len(gt_inds), f"image {image}: valid anchor count"
        pos = gt_inds > 0
        assert torch.equal(cand.positive, pos), f"image {image}: positive sets differ"
        assert torch.equal(gt_index_of(cand.target_boxes[pos], inputs["gt_boxes"][image]), gt_inds[pos] - 1)
        assert torch.equal(cand.labels[pos], inputs["gt_labels"][image][gt_inds[pos] - 1])


def build_loaded(head, kind: str, fixture: dict):
    conversion = convert_head(kind, fixture["state_dict"], target=head.state_dict())
    head.load_state_dict(conversion.state_dict, strict=True)
    return head.eval()  # no dropout / BN here; eval only pins the mode


# ------------------------------------------------------------------------------------------- Faster-RCNN
def faster_rcnn(fixture: dict) -> FasterRCNNHead:
    c = fixture["config"]
    head = FasterRCNNHead(c["num_classes"], c["in_channels"], num_convs=c["num_convs"],
                          rpn_strides=tuple(c["rpn_strides"]), roi_strides=tuple(c["roi_strides"]),
                          finest_scale=c["finest_scale"], fc_channels=c["fc_channels"],
                          num_proposals=c["num_proposals"], nms_pre=c["nms_pre"])
    return build_loaded(head, "faster_rcnn", fixture)


@pytest.mark.parametrize("case", CASES)
def test_faster_rcnn_matches_mmdet(monkeypatch, replay, case):
    torch.set_num_threads(1)
    fixture = load_case("faster_rcnn", case)
    head = faster_rcnn(fixture)
    player = replay(fixture)
    rpn_targets = spy(monkeypatch, rpn_module, "rpn_targets_single")
    proposals = spy(monkeypatch, rpn_module, "proposals_single")
    samples = spy(monkeypatch, roi_module, "sample_rois")
    out = head(aux_inputs(fixture))
    assert player.used == len(player.recorded), f"codetr drew {player.used} permutations, mmdet {len(player.recorded)}"
    assert_losses(fixture, out.losses)

    expected = fixture["assignment"]
    inputs = fixture["inputs"]
    anchors = torch.cat(head.rpn.anchors(inputs["maps"]))
    for image in range(2):
        # RPN: the valid anchors, the sampled positives / negatives and the positives' GT
        valid = valid_anchor_masks(anchors, inputs["image_sizes"])[image]
        assert torch.equal(valid, expected["rpn_valid"][image].bool())
        valid_index = valid.nonzero().squeeze(1)
        rpn = expected["rpn"][image]
        targets = rpn_targets[image]
        assert torch.equal(targets.positive.nonzero().squeeze(1), valid_index[rpn["pos_inds"]])
        sampled = torch.cat((valid_index[rpn["pos_inds"]], valid_index[rpn["neg_inds"]])).sort().values
        assert torch.equal(targets.sampled.nonzero().squeeze(1), sampled)

        # proposals: same boxes in the same (score) order
        boxes, scores = proposals[image]
        assert boxes.shape == expected["proposals"][image].shape, f"image {image}: proposal count"
        torch.testing.assert_close(boxes, expected["proposals"][image], atol=BOX_ATOL, rtol=BOX_RTOL)
        torch.testing.assert_close(scores, expected["proposal_scores"][image], atol=1e-6, rtol=1e-5)

        # RoI sampling: the same RoIs (GT boxes first among the proposals), labels and targets, positives first
        roi = expected["roi"][image]
        sample, cand = samples[image], out.candidates[image]
        num_pos = len(roi["pos_inds"])
        torch.testing.assert_close(sample.boxes, roi["rois"], atol=BOX_ATOL, rtol=BOX_RTOL)
        assert torch.equal(sample.labels, roi["labels"])
        torch.testing.assert_close(sample.target_boxes[:num_pos], roi["target_boxes"][:num_pos])
        assert torch.equal(gt_index_of(cand.target_boxes[:num_pos], inputs["gt_boxes"][image]),
                           roi["pos_assigned_gt_inds"])
        assert cand.num_positives == num_pos and torch.equal(cand.labels, roi["labels"])
        if "features" in roi:  # recorded for the main case: each RoI's 7 x 7 feature averaged (RoIAlign)
            torch.testing.assert_close(cand.features, roi["features"], atol=LOSS_ATOL, rtol=LOSS_RTOL)


# --------------------------------------------------------------------------------------------------- GFL
@pytest.mark.parametrize("case", CASES)
def test_gfl_matches_mmdet(replay, case):
    torch.set_num_threads(1)
    fixture = load_case("gfl", case)
    c = fixture["config"]
    head = build_loaded(GFLHead(c["num_classes"], c["in_channels"], num_convs=c["num_convs"], strides=c["strides"],
                                octave_base_scale=c["octave_base_scale"], reg_max=c["reg_max"], topk=c["topk"]),
                        "gfl", fixture)
    player = replay(fixture)
    inputs = aux_inputs(fixture)
    out = head(inputs)
    assert player.used == len(player.recorded) == 0  # GFL samples nothing
    assert_losses(fixture, out.losses)
    anchors, _, _ = head.anchors(inputs.maps)
    valid = valid_anchor_masks(anchors, inputs.image_sizes)
    for image in range(2):
        assert torch.equal(valid[image], fixture["assignment"]["valid"][image].bool())
    assert_candidates(out.candidates, fixture["assignment"]["gt_inds"], fixture)


# --------------------------------------------------------------------------------------------------- PAA
def paa(fixture: dict) -> PAAHead:
    c = fixture["config"]
    head = PAAHead(c["num_classes"], c["in_channels"], num_convs=c["num_convs"], strides=c["strides"],
                   octave_base_scale=c["octave_base_scale"], topk=c["topk"])
    return build_loaded(head, "paa", fixture)


@pytest.mark.parametrize("case", CASES)
def test_paa_matches_mmdet(replay, case):
    torch.set_num_threads(1)
    fixture = load_case("paa", case)
    head = paa(fixture)
    player = replay(fixture)
    inputs = aux_inputs(fixture)
    out = head(inputs)
    assert player.used == len(player.recorded) == 0  # PAA samples nothing
    assert_losses(fixture, out.losses)
    assert_candidates(out.candidates, fixture["assignment"]["gt_inds"], fixture)


def test_paa_pre_assignment_and_scores_match_mmdet():
    """The two stages under the GMM split: the MaxIoU pre-assignment and the score of each pre-assigned
    positive (focal + 1.3 GIoU, the input of the GMM fit), within LOSS_ATOL / LOSS_RTOL."""
    torch.set_num_threads(1)
    fixture = load_fixture("paa")
    head = paa(fixture)
    inputs = aux_inputs(fixture)
    with torch.no_grad():
        logits, deltas, _ = head.predict(inputs.maps)
    anchors, _ = head.anchors(inputs.maps)
    valid = valid_anchor_masks(anchors, inputs.image_sizes)
    expected = fixture["assignment"]
    for image in range(2):
        keep = valid[image]
        assert torch.equal(keep, expected["valid"][image].bool())
        gt_boxes, gt_labels = inputs.gt_boxes[image], inputs.gt_labels[image]
        pre = head.assigner.assign(anchors[keep], gt_boxes, gt_labels)
        assert torch.equal(pre.gt_inds, expected["pre_gt_inds"][image])
        pos = pre.gt_inds > 0
        matched = pre.gt_inds[pos] - 1
        scores = head.anchor_scores(anchors[keep][pos], logits[image][keep][pos], deltas[image][keep][pos],
                                    gt_labels[matched], gt_boxes[matched])
        torch.testing.assert_close(scores, expected["pos_scores"][image], atol=LOSS_ATOL, rtol=LOSS_RTOL)


# ------------------------------------------------------------------------------------------- the converter
@pytest.mark.parametrize("kind", ["faster_rcnn", "gfl", "paa"])
def test_converter_is_strict(kind):
    fixture = load_fixture(kind)
    state = dict(fixture["state_dict"])
    extra = dict(state, **{"unexpected.weight": torch.zeros(1), "also.unknown": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"also\.unknown, unexpected\.weight"):
        convert_head(kind, extra)
    target = {"faster_rcnn": faster_rcnn, "paa": paa}.get(kind)
    if target is not None:
        head_state = target(fixture).state_dict()
        dropped = dict(state)
        dropped.pop(next(iter(dropped)))
        with pytest.raises(ConversionError, match="without an mmdet value"):
            convert_head(kind, dropped, target=head_state)
        resized = dict(state)
        first = next(iter(resized))
        resized[first] = torch.zeros(3, 3)
        with pytest.raises(ConversionError, match="shapes differ"):
            convert_head(kind, resized, target=head_state)
    with pytest.raises(ConversionError, match="unknown head kind"):
        convert_head("yolo", state)


def test_converter_rpn_tower_of_conv_modules_and_gfl_bins():
    """mmdet's RPNHead with num_convs > 1 keeps its convs as ConvModules (rpn_conv.{i}.conv); GFL's
    integral bins must be 0..reg_max (a checkpoint with other bins would decode other boxes)."""
    head = FasterRCNNHead(4, 32, num_convs=2, fc_channels=16)
    target = head.state_dict()
    mmdet = {}
    for key, value in target.items():
        key = key.replace("rpn.tower.0.", "rpn_head.rpn_conv.0.conv.").replace("rpn.tower.2.", "rpn_head.rpn_conv.1.conv.")
        key = key.replace("rpn.objectness.", "rpn_head.rpn_cls.").replace("rpn.deltas.", "rpn_head.rpn_reg.")
        key = key.replace("bbox_head.fc1.", "bbox_head.shared_fcs.0.").replace("bbox_head.fc2.", "bbox_head.shared_fcs.1.")
        key = key.replace("bbox_head.cls.", "bbox_head.fc_cls.").replace("bbox_head.reg.", "bbox_head.fc_reg.")
        mmdet[key] = torch.randn_like(value)
    converted = convert_head("faster_rcnn", mmdet, target=target).state_dict
    assert torch.equal(converted["rpn.tower.2.weight"], mmdet["rpn_head.rpn_conv.1.conv.weight"])
    head.load_state_dict(converted, strict=True)

    state = dict(load_fixture("gfl")["state_dict"])
    assert convert_head("gfl", state).skipped == ["integral.project"]
    state["integral.project"] = torch.linspace(0, 1, 17)
    with pytest.raises(ConversionError, match="integral.project"):
        convert_head("gfl", state)
