"""Head conflict analysis (Co-DETR Figs. 1-2): Grad-CAM on the encoder output, pairwise KL, S_i, CLI.

References are independent of the code under test: captum's LayerGradCam on a tap module spliced into
the encoder output, hand-computed KL values and a hand-computed S_i.
"""
import json
import math
import subprocess
import sys

import pytest
import torch
from captum.attr import LayerGradCam
from torch import nn

from analysis.conflicts import (ConflictOptions, average_distance, conflict_options, head_conflicts, kl_divergence,
                                pairwise_kl, write_conflicts)
from analysis.gradcam import CamOptions, EncoderOutputCam, merge_levels, to_distribution
from codetr.config import apply_overrides
from codetr.data.collate import collate
from codetr.data.loaders import build_dataset
from codetr.engine.inference import load_detector
from codetr.models.co_detr.aux_features import memory_to_maps
from codetr.models.criterion import build_criterion
from tests.conftest import REPO


@pytest.fixture(scope="module")
def co_model(co_tiny_pp_ckpt):
    """(detector with its auxiliary heads, criterion, val dataset with the test transforms)."""
    detector = load_detector(co_tiny_pp_ckpt, "cpu", use_ema=True, deploy=False)
    dataset = build_dataset(apply_overrides(detector.cfg, ["data.augment=false"]).data, "val")
    return detector, build_criterion(detector.model, detector.cfg.model), dataset


class LevelTap(nn.Module):
    """Identity on the encoder's level maps: gives captum a layer whose outputs are the [1, C, H_l, W_l] maps."""

    def forward(self, *maps):
        return maps


# Each head's training weights, as the released config writes them (DETR: cls 2, L1 5, GIoU 2).
TERM_WEIGHTS = {
    "detr": {"loss_cls": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    "atss": {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0},
    "faster_rcnn": {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 1.0, "loss_cls": 1.0, "loss_bbox": 10.0},
}


def captum_level_cams(detector, criterion, batch, head: str, loss_prefixes: tuple[str, ...], seed: int) -> list[torch.Tensor]:
    """captum LayerGradCam of head's loss (terms `loss_prefixes` times TERM_WEIGHTS[head]) on each encoder
    level: L x [H_l, W_l]."""
    model, tap = detector.model, LevelTap()

    def splice(module, args, output):  # memory [1, S, C] -> level maps -> tap -> memory again
        maps, _ = memory_to_maps(output, args[1])
        return torch.cat([m.flatten(2).transpose(1, 2) for m in tap(*maps)], 1)

    def forward_func(images):
        torch.manual_seed(seed)  # the same sampling as EncoderOutputCam(seed)
        outputs = model(images, batch.masks)
        outputs.aux = model.aux(outputs, batch.masks, batch.targets, model.transformer.decoder)
        losses = criterion(outputs, batch.targets)
        terms = [v * TERM_WEIGHTS[head][k.rsplit(".", 1)[1]] for k, v in losses.items() if k.startswith(loss_prefixes)]
        return torch.stack(terms).sum().reshape(1)

    hook = model.transformer.encoder_layers[-1].register_forward_hook(splice)
    try:
        with torch.random.fork_rng(devices=[]):
            attributions = LayerGradCam(forward_func, tap).attribute(batch.images, relu_attributions=True)
    finally:
        hook.remove()
    return [a[0, 0].detach() for a in attributions]


def test_cam_matches_captum_layer_gradcam(co_model):
    """Every level's CAM of three heads (faster_rcnn: random RoI sampling, so seeding matters too) equals
    captum's LayerGradCam on the same maps and target; tolerance rtol 1e-4, atol 1e-6 x the head's largest
    CAM value."""
    detector, criterion, dataset = co_model
    batch = collate([dataset[0]])
    with EncoderOutputCam(detector.model, criterion, CamOptions()) as cams:
        mine = cams(batch, seed=5)
    loss_terms = {"detr": ("dec.", "enc."), "atss": ("aux.atss.",), "faster_rcnn": ("aux.faster_rcnn.",)}
    for head, prefixes in loss_terms.items():
        reference = captum_level_cams(detector, criterion, batch, head, prefixes, seed=5)
        assert len(reference) == len(mine.level_cams[head]) == 4
        scale = max(float(r.max()) for r in reference)
        assert scale > 0, head  # a level may be all zero after the ReLU, but not every level
        for level, (ours, theirs) in enumerate(zip(mine.level_cams[head], reference)):
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6 * scale, msg=f"{head} level {level}")
    # the context manager restored the model (parameters trainable again, no hooks left)
    assert all(p.requires_grad for p in detector.model.parameters())
    assert not detector.model.transformer.encoder_layers[-1]._forward_hooks


def test_distribution_of_merged_levels():
    """Bilinear-resized levels averaged on the finest grid, divided by the sum; exact to 1e-6."""
    fine, coarse = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0]])
    merged = merge_levels([fine, coarse], CamOptions())
    torch.testing.assert_close(merged, torch.tensor([[1.5, 1.0], [1.0, 1.5]]), rtol=0, atol=1e-6)
    distribution, degenerate = to_distribution(merged)
    torch.testing.assert_close(distribution, merged / 5.0, rtol=0, atol=1e-6)
    assert not degenerate
    uniform, degenerate = to_distribution(torch.zeros(2, 3))
    assert degenerate and torch.allclose(uniform, torch.full((2, 3), 1 / 6))


def test_normalized_level_weighting_gives_every_level_equal_mass():
    """level_weighting="normalized": an 8x8 level and a 1x1 level each carry half the merged mass on the
    8x8 grid (the 1x1 level upsampled is uniform 1/64 per cell); exact to 1e-6."""
    fine = torch.zeros(8, 8)
    fine[0, 0] = 3.0
    merged = merge_levels([fine, torch.tensor([[5.0]])], CamOptions(level_weighting="normalized"))
    expected = torch.full((8, 8), 0.5 / 64)
    expected[0, 0] += 0.5
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)  # the mean of two unit-mass maps
    torch.testing.assert_close(merged.sum(), torch.tensor(1.0), rtol=0, atol=1e-6)


def test_kl_identical_zero_and_hand_pair():
    """KL(P || P) = 0 (to 1e-12); KL([.5, .5] || [.9, .1]) = .5 ln(.5/.9) + .5 ln(5) = 0.5108256: to 1e-12
    in float64 without epsilon, to 1e-7 with the default epsilon 1e-8."""
    p = torch.rand(7, 9)
    p = p / p.sum()
    assert abs(float(kl_divergence(p, p))) < 1e-12
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    half, skewed = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    assert abs(float(kl_divergence(half, skewed, epsilon=0.0)) - expected) < 1e-12
    assert abs(float(kl_divergence(half, skewed)) - expected) < 1e-7
    assert abs(float(kl_divergence(half, skewed, reduction="mean")) - expected / 2) < 1e-7
    # a zero in Q stays finite with epsilon: 1 * (log(1 + eps) - log(eps))
    assert math.isclose(float(kl_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), epsilon=1e-8)),
                        math.log(1 + 1e-8) - math.log(1e-8), rel_tol=1e-9)
    matrix = pairwise_kl([half, skewed], epsilon=0.0)
    assert matrix[0, 0] == 0 and matrix[1, 1] == 0 and abs(float(matrix[0, 1]) - expected) < 1e-12
    assert float(matrix[1, 0]) != pytest.approx(float(matrix[0, 1]))  # KL is asymmetric


def test_average_distance_hand_matrix():
    """S_i = 1/(2(N-1)) sum_{j != i}(S_ij + S_ji), N = 3: (1+2+3+5)/4, (3+4+1+6)/4, (5+6+2+4)/4 (exact)."""
    matrix = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0], [5.0, 6.0, 0.0]], dtype=torch.float64)
    assert average_distance(matrix).tolist() == [2.75, 3.5, 4.25]
    with pytest.raises(ValueError):
        average_distance(torch.zeros(1, 1))


def test_conflict_matrix_on_checkpoint(co_model, tmp_path):
    """On a real tiny checkpoint: zero diagonal, non-negative, asymmetric (|S - S^T| > 1e-3 somewhere),
    deterministic (a second run is identical), per-image values averaged into the matrix (to 1e-12)."""
    detector, criterion, dataset = co_model
    options = ConflictOptions(num_images=3)
    result = head_conflicts(detector.model, criterion, dataset, options, keep_examples=1, progress=False)
    assert result.heads == ["detr", "atss", "faster_rcnn"]
    assert result.matrix.shape == (3, 3) and result.per_image.shape == (3, 3, 3)
    assert torch.all(result.matrix.diagonal() == 0) and torch.all(result.matrix >= 0)
    assert float((result.matrix - result.matrix.T).abs().max()) > 1e-3
    torch.testing.assert_close(result.matrix, result.per_image.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(result.average, average_distance(result.matrix), rtol=0, atol=1e-12)
    frame = result.to_frame()
    assert list(frame.columns) == [*result.heads, "S_i"] and list(frame.index) == result.heads
    assert frame.drop(columns="S_i").to_numpy().tolist() == result.matrix.tolist()
    assert frame["S_i"].tolist() == result.average.tolist()
    again = head_conflicts(detector.model, criterion, dataset, options, progress=False)
    assert torch.equal(result.matrix, again.matrix)
    (example,) = result.examples
    for distribution in example.distributions.values():
        assert abs(float(distribution.sum()) - 1) < 1e-5 and float(distribution.min()) >= 0
    paths = write_conflicts(result, tmp_path)
    assert [p.name for p in paths] == ["conflicts.csv", "conflicts.json", "conflicts_heatmap.png",
                                       f"image_{example.image_id}.png"]


def test_score_target_with_positive_query_branches(co_model):
    """target="score" with the positive-query branches: 5 heads, finite positive targets, zero diagonal."""
    detector, criterion, dataset = co_model
    options = ConflictOptions(num_images=1, cam=CamOptions(target="score", include_posq=True, score_topk=20))
    result = head_conflicts(detector.model, criterion, dataset, options, progress=False)
    assert result.heads == ["detr", "atss", "faster_rcnn", "posq.atss", "posq.faster_rcnn"]
    assert torch.isfinite(result.matrix).all() and torch.all(result.matrix.diagonal() == 0)
    # each target is a sum of 20 probabilities
    assert torch.all(result.targets > 0) and torch.all(result.targets <= 20)


def test_conflict_options_from_key_value_strings():
    """`codetr conflicts --option KEY=VALUE` reaches every CamOptions / ConflictOptions field, typed."""
    base = ConflictOptions(CamOptions(target="score"), num_images=7)
    options = conflict_options(["level_weighting=normalized", "levels=0,2", "epsilon=0", "kl_reduction=mean",
                                "loss_weighting=raw"], base)
    assert options.cam == CamOptions(target="score", level_weighting="normalized", levels=(0, 2), loss_weighting="raw")
    assert (options.num_images, options.epsilon, options.kl_reduction) == (7, 0.0, "mean")
    assert conflict_options(["levels=none"], options).cam.levels is None
    from codetr.errors import ConfigError
    for bad, says in (("colour=red", "level_weighting"), ("epsilon=abc", "expected a number"),
                      ("resize_mode=cubic", "resize_mode"), ("target", "KEY=VALUE")):
        with pytest.raises(ConfigError, match=says):
            conflict_options([bad])


def codetr(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_conflicts_end_to_end(co_tiny_pp_ckpt, synth_root, cli_env, tmp_path):
    out = tmp_path / "conflicts"
    result = codetr("conflicts", "--ckpt", co_tiny_pp_ckpt, "--data", synth_root, "--num-images", "2", "--overlays", "1",
                    "--out", out, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "S_i" in result.stdout and "faster_rcnn" in result.stdout
    report = json.loads((out / "conflicts.json").read_text())
    assert report["heads"] == ["detr", "atss", "faster_rcnn"] and len(report["per_image"]) == 2
    assert report["options"]["cam"]["target"] == "loss"
    rows = (out / "conflicts.csv").read_text().splitlines()
    assert rows[0] == "head,detr,atss,faster_rcnn,S_i" and len(rows) == 4
    assert (out / "conflicts_heatmap.png").stat().st_size > 0
    assert len(list((out / "overlays").glob("image_*.png"))) == 1


def test_cli_conflicts_missing_checkpoint(cli_env, tmp_path):
    missing = tmp_path / "nope.pt"
    result = codetr("conflicts", "--ckpt", missing, "--out", tmp_path / "out", env=cli_env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.pt" in lines[0], result.stderr
