"""IoF-IoB analysis: the maps, the counts and the AUC against hand-computed values, and `codetr iof-iob`."""
import csv
import json
import math
import shutil

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image

from analysis.eval_subset import image_sizes_from_masks
from analysis.figures import save_figure
from analysis.iof_iob import (
    CrossAttentionRecorder,
    Curve,
    CurveAccumulator,
    IoFIoBResult,
    attention_density,
    bilinear_splat,
    curve_auc,
    decoder_attention_maps,
    encoder_discriminability,
    foreground_mask,
    image_maps,
    iof_iob,
)
from analysis.iof_iob_plots import plot_iof_iob
from analysis.labels import checkpoint_labels
from codetr.config import apply_overrides
from codetr.data.collate import collate
from codetr.data.loaders import build_dataset
from codetr.engine.inference import load_detector
from codetr.errors import ConfigError
from codetr.models.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention
from tests.test_cli import assert_one_line_error, codetr


def test_foreground_mask_uses_pixel_centres():
    # box x in [1, 3), y in [0, 1.6): pixel centres x = 1.5, 2.5 and y = 0.5, 1.5 are inside
    mask = foreground_mask(torch.tensor([[1.0, 0.0, 3.0, 1.6]]), height=3, width=4)
    expected = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert not foreground_mask(torch.zeros(0, 4), 2, 2).any()


def test_iof_iob_hand_computed():
    score = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.8, 0.1]])
    fg = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)  # fg values 0.9, 0.6, 0.8; bg 0.2, 0.4, 0.1
    thresholds = torch.tensor([0.0, 0.3, 0.4, 0.6, 0.7, 0.85, 1.0])
    iof, iob = iof_iob(score, fg, thresholds)
    # strictly above: at S = 0.6 the fg value 0.6 is not counted, at S = 0.4 the bg value 0.4 is not
    expected_iof = torch.tensor([3, 3, 3, 2, 2, 1, 0], dtype=torch.float64) / 3
    expected_iob = torch.tensor([3, 1, 0, 0, 0, 0, 0], dtype=torch.float64) / 3
    torch.testing.assert_close(iof, expected_iof, rtol=0, atol=1e-12)
    torch.testing.assert_close(iob, expected_iob, rtol=0, atol=1e-12)


def test_curve_auc_of_hand_made_curves():
    assert math.isclose(curve_auc([0.25, 0.5, 0.75], [0.25, 0.5, 0.75]), 0.5, abs_tol=1e-12)  # chance
    assert math.isclose(curve_auc([0.0], [1.0]), 1.0, abs_tol=1e-12)  # perfect separation
    # one point (0.5, 0.75), given unsorted with the closing points: 0.5 * 0.75 / 2 + 0.5 * 1.75 / 2
    assert math.isclose(curve_auc([1.0, 0.5, 0.0], [1.0, 0.75, 0.0]), 0.625, abs_tol=1e-12)


def test_accumulator_counts_are_exact_and_auc_is_the_pairwise_probability():
    generator = torch.Generator().manual_seed(0)
    bins = 1000
    images = []
    for height, width in ((5, 7), (6, 4)):
        # values (k + 0.5) / bins: ties between pixels, but never on a threshold k / bins
        score = (torch.randint(0, bins, (height, width), generator=generator).double() + 0.5) / bins
        images.append((score, torch.rand(height, width, generator=generator) < 0.4))
    acc = CurveAccumulator(bins)
    for score, fg in images:
        acc.add(score, fg)
    thresholds = acc.thresholds
    # per image: the mean of each image's exact curve
    per_image = [iof_iob(score, fg, thresholds) for score, fg in images]
    iof, iob = acc.curve("per_image")
    torch.testing.assert_close(iof, (per_image[0][0] + per_image[1][0]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(iob, (per_image[0][1] + per_image[1][1]) / 2, rtol=0, atol=1e-12)
    # pooled: all pixels as one image; its AUC = P(fg value > bg value) + P(tie) / 2 (brute force over pairs)
    all_scores = torch.cat([s.flatten() for s, _ in images])
    all_fg = torch.cat([f.flatten() for _, f in images])
    iof, iob = acc.curve("pooled")
    exact = iof_iob(all_scores, all_fg, thresholds)
    torch.testing.assert_close(iof, exact[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(iob, exact[1], rtol=0, atol=1e-12)
    fg_values, bg_values = all_scores[all_fg], all_scores[~all_fg]
    pairs = fg_values[:, None] - bg_values[None, :]
    probability = ((pairs > 0).double().mean() + 0.5 * (pairs == 0).double().mean()).item()
    assert math.isclose(curve_auc(iob, iof), probability, abs_tol=1e-9)


def test_encoder_discriminability_on_a_hand_made_memory():
    # levels: 2x2 and 1x1, C = 2; token norms 5, 0, 2, 10 | 1
    memory = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, 2.0], [6.0, 8.0], [1.0, 0.0]]])
    shapes = torch.tensor([[2, 2], [1, 1]])
    no_padding = torch.zeros(1, 5, dtype=torch.bool)
    (d,) = encoder_discriminability(memory, shapes, no_padding, torch.tensor([[2, 2]]), strides=(1, 2))
    # level 0 divided by its max 10 (a 2x2 -> 2x2 resize is the identity), level 1 is 1 everywhere
    torch.testing.assert_close(d, torch.tensor([[0.75, 0.5], [0.6, 1.0]]), rtol=0, atol=1e-6)

    # the right column of level 0 is padding (its value 100 must not be the max): valid image 2x1
    memory[0, 1] = memory[0, 3] = torch.tensor([60.0, 80.0])
    padding = torch.tensor([[False, True, False, True, False]])
    (d,) = encoder_discriminability(memory, shapes, padding, torch.tensor([[2, 1]]), strides=(1, 2))
    torch.testing.assert_close(d, torch.tensor([[1.0], [0.7]]), rtol=0, atol=1e-6)  # ([5, 2] / 5 + 1) / 2


def test_coarse_cells_overhang_the_image_instead_of_being_squeezed():
    """Image 1x3 px, one level of stride 2 with ceil(3 / 2) = 2 valid cells, norms 1 and 3 (max 3): the
    cells cover pixels [0, 2) and [2, 4), so the map is the 1x4 bilinear upsampling cropped to 3 pixels.
    Upsampling 2 -> 4 (align_corners=False) samples the cells at -0.25 (clamped), 0.25, 0.75, 1.25:
    [1, .75 + .25 * 3, .25 + .75 * 3] / 3 = [1/3, 1/2, 5/6]. Squeezing both cells onto 3 pixels would give
    [1/3, 2/3, 1]."""
    memory = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # [B=1, S=2, C=2]
    (d,) = encoder_discriminability(memory, torch.tensor([[1, 2]]), torch.zeros(1, 2, dtype=torch.bool),
                                    torch.tensor([[1, 3]]), strides=(2,))
    torch.testing.assert_close(d, torch.tensor([[1 / 3, 1 / 2, 5 / 6]]), rtol=0, atol=1e-6)


def test_bilinear_splat_is_the_gradient_of_grid_sample():
    generator = torch.Generator().manual_seed(1)
    locations = torch.rand(12, 2, generator=generator) * 1.2 - 0.1  # some corners fall outside the map
    weights = torch.rand(12, generator=generator)
    height, width = 3, 5
    value = torch.zeros(1, 1, height, width, requires_grad=True)
    sampled = F.grid_sample(value, (2 * locations - 1)[None, None], mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # [1, 1, 1, 12]
    (sampled[0, 0, 0] * weights).sum().backward()
    torch.testing.assert_close(bilinear_splat(locations, weights, height, width), value.grad[0, 0], rtol=0, atol=1e-6)
    # a point on a cell centre puts all its weight on that cell
    centre = torch.tensor([[(2 + 0.5) / width, (1 + 0.5) / height]])
    expected = torch.zeros(height, width)
    expected[1, 2] = 0.7
    torch.testing.assert_close(bilinear_splat(centre, torch.tensor([0.7]), height, width), expected, rtol=0, atol=1e-6)


def test_attention_density_hand_made():
    # image 2x2: level 0 (2x2, cells of 1 px) has mass 2 on its top-left cell; level 1 (1x1, 4 px) mass 4
    mass = torch.tensor([2.0, 0.0, 0.0, 0.0, 4.0])
    density = attention_density(mass, torch.tensor([[2, 2], [1, 1]]), torch.zeros(5, dtype=torch.bool), (2, 2),
                                strides=(1, 2))
    torch.testing.assert_close(density, torch.tensor([[1.0, 1 / 3], [1 / 3, 1 / 3]]), rtol=0, atol=1e-6)  # [[3,1],[1,1]]/3


def test_recorded_locations_and_weights_reproduce_the_cross_attention():
    torch.manual_seed(0)
    attn = MSDeformAttn(embed_dim=16, num_heads=2, num_levels=2, num_points=3)
    torch.nn.init.normal_(attn.sampling_offsets.weight, std=0.1)
    torch.nn.init.normal_(attn.attention_weights.weight, std=0.1)
    shapes = torch.tensor([[4, 5], [2, 3]])
    query, value = torch.randn(2, 7, 16), torch.randn(2, 26, 16)
    reference = torch.rand(2, 7, 2, 4) * 0.5 + 0.25  # cxcywh boxes
    with CrossAttentionRecorder(attn) as recorder:
        out = attn(query, reference, value, shapes)
    assert recorder.locations.shape == (2, 7, 2, 2, 3, 2) and recorder.weights.shape == (2, 7, 2, 2, 3)
    projected = attn.value_proj(value).view(2, 26, 2, 8)
    again = attn.output_proj(multi_scale_deformable_attention(projected, shapes, recorder.locations, recorder.weights))
    torch.testing.assert_close(again, out, rtol=1e-5, atol=1e-5)


def test_image_maps_match_the_building_blocks(tiny_ckpt):
    detector = load_detector(tiny_ckpt, "cpu")
    dataset = build_dataset(apply_overrides(detector.cfg, ["data.augment=false"]).data, "val")
    batch = collate([dataset[0], dataset[1]])
    maps = image_maps(detector.model, batch, ("decoder", "encoder"), top_queries=5)
    assert list(maps) == ["decoder", "encoder"]
    sizes = image_sizes_from_masks(batch.masks)
    with torch.no_grad(), CrossAttentionRecorder(detector.model.transformer.decoder.layers[-1].cross_attn) as recorder:
        out = detector.model(batch.images, batch.masks)
    feats = out.feats
    expected = {
        "encoder": encoder_discriminability(out.memory, feats.spatial_shapes, feats.padding_mask, sizes),
        "decoder": decoder_attention_maps(recorder.locations, recorder.weights, out.pred_logits.sigmoid().amax(-1), 5,
                                          feats.spatial_shapes, feats.padding_mask, sizes),
    }
    for variant, per_image in maps.items():
        assert len(per_image) == 2
        for d, want, (height, width) in zip(per_image, expected[variant], sizes.tolist()):
            assert d.shape == (height, width) and 0 <= float(d.min()) and float(d.max()) <= 1
            torch.testing.assert_close(d, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown variant"):
        image_maps(detector.model, batch, ("encoder", "backbone"))


def test_checkpoint_labels_are_short_and_unique(tmp_path):
    paths = [tmp_path / "x" / "a" / "last.pt", tmp_path / "y" / "a" / "last.pt", tmp_path / "b" / "epoch_001.pt"]
    assert checkpoint_labels(paths) == ["x/a/last", "y/a/last", f"{tmp_path.name}/b/epoch_001"]
    assert checkpoint_labels([paths[2]]) == ["b/epoch_001"]
    same_stem = [tmp_path / "a" / "last.pt", tmp_path / "a" / "last.pth"]
    assert checkpoint_labels(same_stem) == ["a/last.pt", "a/last.pth"]
    with pytest.raises(ConfigError, match="given twice"):
        checkpoint_labels([paths[0], tmp_path / "x" / "b" / ".." / "a" / "last.pt"])


def test_plot_iof_iob_returns_a_figure_and_keeps_the_backend(tmp_path):
    backend = matplotlib.get_backend()
    curve = Curve(iof=[1.0, 0.5, 0.0], iob=[1.0, 0.2, 0.0], auc=0.75)
    results = [IoFIoBResult(label, f"{label}.pt", variant, [0.0, 0.5, 1.0], {"pooled": curve, "per_image": curve}, 4, 4)
               for label in ("a/last", "b/last") for variant in ("encoder", "decoder")]
    figure = plot_iof_iob(results, "pooled")
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    assert matplotlib.get_backend() == backend
    path = save_figure(figure, tmp_path / "curves.png", dpi=120)
    with Image.open(path) as png:
        assert png.size == (1200, 552)


def test_cli_iof_iob_end_to_end(tiny_ckpt, co_tiny_pp_ckpt, synth_root, cli_env, tmp_path):
    out = tmp_path / "iof"
    result = codetr("iof-iob", "--ckpt", tiny_ckpt, "--ckpt", co_tiny_pp_ckpt, "--data", synth_root, "--num-images", "4",
                    "--thresholds", "21", "--out", out, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "AUC pooled" in result.stdout
    with open(out / "auc.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2  # checkpoints x variants x aggregations
    assert all(0.0 <= float(row["auc"]) <= 1.0 and row["images"] == "4" for row in rows)
    assert {row["checkpoint"] for row in rows} == {f"{p.parent.name}/last" for p in (tiny_ckpt, co_tiny_pp_ckpt)}
    results = json.loads((out / "iof_iob.json").read_text())["results"]
    for r in results:  # reported thresholds include S = 0 and S = 1; IoF and IoB fall as S rises
        curve = r["curves"]["pooled"]
        assert r["thresholds"][0] == 0.0 and r["thresholds"][-1] == 1.0 and len(r["thresholds"]) <= 23
        assert all(a >= b for a, b in zip(curve["iof"], curve["iof"][1:]))
        assert curve["iof"][-1] == 0.0 and curve["iob"][-1] == 0.0
    with Image.open(out / "iof_iob.png") as png:
        assert png.size[0] > png.size[1] > 100


def test_cli_iof_iob_over_a_grid_labels_curves_by_point(tiny_ckpt, co_tiny_pp_ckpt, synth_root, tmp_path):
    """`--grid`: one curve per finished point (seed 0's last.pt) labelled by the point, beside any --ckpt; a point
    trained with model.method=co_detr deploys as its one-to-one detector; unfinished points are skipped."""
    from typer.testing import CliRunner

    from cli import app
    from experiments.ablate import Schedule, grid_from_flags, resolve_base
    from experiments.store import DONE, open_grid, update_status

    grid = tmp_path / "grid"
    spec, base = resolve_base(grid_from_flags([("method", "deformable_detr,co_detr,h_detr")], preset="co_tiny_pp"),
                              Schedule(), None)
    runs = {run.point.values["method"]: run for run in open_grid(grid, spec, base)}
    shutil.copy(tiny_ckpt, runs["deformable_detr"].directory / "last.pt")
    state = torch.load(co_tiny_pp_ckpt, map_location="cpu", weights_only=True)
    state["config"]["model"]["method"] = "co_detr"  # as the grid's `method=co_detr` point trains it
    torch.save(state, runs["co_detr"].directory / "last.pt")
    for method in ("deformable_detr", "co_detr"):
        update_status(runs[method].directory, state=DONE)
    out = tmp_path / "iof"
    result = CliRunner().invoke(app, ["iof-iob", "--grid", str(grid), "--ckpt", str(tiny_ckpt), "--data", str(synth_root),
                                      "--num-images", "2", "--variant", "encoder", "--thresholds", "11", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipping the unfinished points method=h_detr" in result.output
    with open(out / "auc.csv") as f:
        labels = list(dict.fromkeys(row["checkpoint"] for row in csv.DictReader(f)))
    assert labels == [f"{tiny_ckpt.parent.name}/last", "method=deformable_detr", "method=co_detr"]
    results = json.loads((out / "iof_iob.json").read_text())["results"]
    assert [r["path"] for r in results][1:] == [str(runs[m].directory / "last.pt") for m in ("deformable_detr", "co_detr")]
    nothing = CliRunner().invoke(app, ["iof-iob", "--out", str(out)])
    assert nothing.exit_code == 2 and "give --ckpt CHECKPOINT (repeatable), --grid GRID_FOLDER, or both" in nothing.output


def test_cli_iof_iob_bad_input(cli_env, tmp_path):
    result = codetr("iof-iob", "--ckpt", tmp_path / "missing.pt", "--out", tmp_path / "o", env=cli_env)
    assert_one_line_error(result, "checkpoint not found", "missing.pt")
