"""Matching instability IS: the counts on hand-made assignments, the matching step against brute force, and
`codetr instability` end to end on a 3-epoch `tiny` run (plus bad input: one line, exit 2)."""
import itertools
import json

import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from analysis.instability import (
    UNMATCHED,
    InstabilityStats,
    RunSpec,
    assignment_from_match,
    checkpoint_assignments,
    image_instability,
    instability,
    match_assignments,
    resolve_runs,
)
from cli import app
from codetr.config import apply_overrides, get_preset
from codetr.data.collate import Batch
from codetr.errors import ConfigError
from codetr.models.detector import DetectorOutput
from codetr.models.matcher import HungarianMatcher


def test_is_on_hand_made_assignments():
    previous = [[3, 7, 1], [0, 5], [], [4]]
    current = [[3, 1, 7], [0, 9], [], [4]]
    # image 0: boxes 1 and 2 swap queries 7 and 1 -> 2 boxes, 2 queries changed
    # image 1: box 1 moves from query 5 to the free query 9 -> 1 box; queries 5 (1 -> none) and 9 (none -> 1)
    # image 2: no boxes -> 0; image 3: box 0 keeps query 4 -> 0
    assert [image_instability(p, c) for p, c in zip(previous, current)] == [(2, 2), (1, 2), (0, 0), (0, 0)]
    stats = instability(previous, [torch.tensor(c) for c in current])  # lists and tensors alike
    assert stats == InstabilityStats(num_images=4, num_boxes=6, changed_boxes=3, changed_queries=4)
    assert stats.is_per_image == 0.75 and stats.changed_fraction == 0.5 and stats.is_by_query_per_image == 1.0
    assert instability(previous, previous).changed_fraction == 0.0


def test_is_with_unmatched_boxes_and_without_boxes():
    # more boxes than queries: a box unmatched at both epochs is unchanged, matched at one epoch only changed
    assert image_instability([UNMATCHED, 2], [UNMATCHED, 5]) == (1, 2)
    assert image_instability([0, UNMATCHED], [UNMATCHED, 0]) == (2, 1)  # query 0 now holds box 1: one query
    empty = instability([[], []], [[], []])
    assert (empty.num_images, empty.num_boxes, empty.is_per_image) == (2, 0, 0.0)
    assert empty.changed_fraction != empty.changed_fraction  # NaN: no boxes to change


def test_is_rejects_assignments_that_do_not_correspond():
    with pytest.raises(ValueError, match="same images"):
        instability([[0]], [[0], [1]])
    with pytest.raises(ValueError, match="image 1: the image has 2 boxes"):
        instability([[0], [1, 2]], [[0], [1]])
    with pytest.raises(ValueError, match="one-to-one"):
        image_instability([1, 1], [0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        image_instability([-2], [0])


def test_assignment_from_match_inverts_the_matcher_pairs():
    assignment = assignment_from_match(torch.tensor([2, 5, 7]), torch.tensor([1, 3, 0]), num_targets=4)
    assert assignment.tolist() == [7, 2, UNMATCHED, 5]
    assert assignment_from_match(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0).numel() == 0


class FixedOutputs(nn.Module):
    """Returns given per-layer predictions whatever the images: [(logits [B, Q, C], boxes [B, Q, 4])]."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> DetectorOutput:
        return DetectorOutput(self.layers[-1][0], self.layers[-1][1], layers=self.layers)


def brute_force(cost: torch.Tensor) -> list[int]:
    """cost [Q, M] -> the query of each of the M boxes minimising the total, over all injective assignments."""
    num_queries, num_boxes = cost.shape
    best = min(itertools.permutations(range(num_queries), num_boxes),
               key=lambda queries: sum(float(cost[q, m]) for m, q in enumerate(queries)))
    return list(best)


def test_match_assignments_equal_brute_force_on_the_chosen_layer():
    generator = torch.Generator().manual_seed(0)
    num_queries, num_classes, sizes = 5, 3, (3, 0, 2)
    layers = [(torch.randn(3, num_queries, num_classes, generator=generator),
               torch.rand(3, num_queries, 4, generator=generator) * 0.5 + 0.25) for _ in range(3)]
    targets = [{"boxes": torch.rand(n, 4, generator=generator) * 0.5 + 0.25,
                "labels": torch.randint(0, num_classes, (n,), generator=generator), "image_id": 10 + i}
               for i, n in enumerate(sizes)]
    batch = Batch(torch.zeros(3, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.bool), targets)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    model = FixedOutputs(layers).train()
    for layer in (0, -1):
        image_ids, assignments = match_assignments(model, [batch], matcher, layer=layer)
        assert image_ids == [10, 11, 12] and model.training  # the caller's mode is restored
        cost = matcher.batch_cost(*layers[layer], targets)  # [B, Q, sum M]
        start = 0
        for image, n in enumerate(sizes):
            assert assignments[image].tolist() == brute_force(cost[image, :, start:start + n]), (layer, image)
            start += n
    with pytest.raises(ConfigError, match="--layer 3: the decoder has 3 layers"):
        match_assignments(model, [batch], matcher, layer=3)


def test_runs_from_folders_and_bad_run_specs(tmp_path):
    run = tmp_path / "co"
    run.mkdir()
    for name in ("epoch_010.pt", "epoch_002.pt", "epoch_009.pt", "last.pt"):
        (run / name).write_bytes(b"")
    runs = resolve_runs([], None, [run])
    assert runs == [RunSpec("co", tuple(run / f"epoch_{n:03d}.pt" for n in (2, 9, 10)))]  # numeric order
    grid_point = resolve_runs([], None, [], [("method=h_detr", run)])  # `--grid`: labelled by the point
    assert grid_point == [RunSpec("method=h_detr", runs[0].checkpoints)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no epoch_XXX.pt"):
        resolve_runs([], None, [tmp_path / "empty"])
    with pytest.raises(ConfigError, match="two runs are named 'co'"):
        resolve_runs([run / "epoch_002.pt", run / "epoch_009.pt"], None, [run])  # the --ckpt run defaults to "co"
    with pytest.raises(ConfigError, match="same checkpoint is given twice"):
        resolve_runs([run / "epoch_002.pt", run / "epoch_002.pt"], "x", [])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cli_bad_input_is_one_line(tmp_path):
    runner, out = CliRunner(), ["--out", str(tmp_path / "out")]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    assert_one_line_error(runner.invoke(app, ["instability", "--run", str(tmp_path / "run"), *out]),
                          "no epoch_XXX.pt")
    assert_one_line_error(runner.invoke(app, ["instability", "--ckpt", str(tmp_path / "a.pt"), *out]),
                          "1 checkpoint(s)", "at least 2")
    assert_one_line_error(runner.invoke(app, ["instability", "--ckpt", str(tmp_path / "a.pt"), "--ckpt",
                                              str(tmp_path / "b.pt"), *out]), "checkpoint not found", "a.pt")
    assert_one_line_error(runner.invoke(app, ["instability", *out]), "give --ckpt")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def three_epoch_run(synth_root, tmp_path_factory):
    """`tiny` trained for 3 epochs of 2 iterations (epoch_001.pt .. epoch_003.pt), evaluated once at the end."""
    from codetr.engine.train import train

    cfg = apply_overrides(get_preset("tiny"), [
        f"data.root={synth_root}", "optim.epochs=3", "train.max_iters_per_epoch=2", "train.eval_every=0",
        "data.batch_size=2", "data.train_scales=[160]", "data.max_size=200", "data.augment=false",
        "data.test_size=160", "data.test_max_size=200", "data.num_workers=0", "train.seed=0",
    ])
    out = tmp_path_factory.mktemp("instability_run") / "tiny3"
    train(cfg, out, progress=False)
    return out


@pytest.mark.slow
def test_cli_instability_end_to_end(three_epoch_run, synth_root, tmp_path):
    run, out = three_epoch_run, tmp_path / "out"
    first, last = run / "epoch_001.pt", run / "epoch_003.pt"
    result = CliRunner().invoke(app, ["instability", "--run", str(run), "--ckpt", str(first), "--ckpt", str(last),
                                      "--label", "pair", "--data", str(synth_root), "--max-images", "6",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "matching instability" in result.stdout and "tiny3" in result.stdout

    frame = pd.read_csv(out / "instability.csv")
    assert list(zip(frame["run"], frame["prev_epoch"], frame["epoch"])) == [("pair", 1, 3), ("tiny3", 1, 2),
                                                                            ("tiny3", 2, 3)]
    assert (frame["epoch_source"] == "checkpoint").all() and (frame["num_images"] == 6).all()
    boxes = int(frame["num_boxes"].iloc[0])
    assert boxes > 0 and (frame["num_boxes"] == boxes).all()
    assert ((frame["changed_fraction"] >= 0) & (frame["changed_fraction"] <= 1)).all()
    assert ((frame["is_per_image"] * 6 - frame["changed_boxes"]).abs() < 1e-4).all()  # the CSV keeps 6 digits
    # by query: between the changed boxes and twice them (every box is matched: 50 queries)
    assert ((frame["is_by_query_per_image"] >= frame["is_per_image"] - 1e-5)  # the CSV rounds to 6 digits
            & (frame["is_by_query_per_image"] <= 2 * frame["is_per_image"] + 1e-5)).all()
    # the pair's row is what the API gives for the two checkpoints
    before, after = (checkpoint_assignments(p, "cpu", synth_root, max_images=6) for p in (first, last))
    assert (before.epoch, after.epoch, before.num_queries) == (1, 3, 50)
    assert sum(len(a) for a in before.assignments) == boxes
    stats = instability(before.assignments, after.assignments)
    assert stats.changed_boxes == frame["changed_boxes"].iloc[0] and stats.num_boxes == boxes

    saved = json.loads((out / "instability.json").read_text())
    assert saved["settings"]["layer"] == -1 and len(saved["rows"]) == 3
    with Image.open(out / "instability.png") as png:
        assert png.size[0] > png.size[1] > 100


@pytest.mark.slow
def test_cli_instability_refuses_checkpoints_of_different_class_counts(three_epoch_run, tmp_path):
    state = torch.load(three_epoch_run / "epoch_002.pt", map_location="cpu", weights_only=True)
    state["num_classes"] += 1
    other = tmp_path / "other_classes.pt"
    torch.save(state, other)
    result = CliRunner().invoke(app, ["instability", "--ckpt", str(three_epoch_run / "epoch_001.pt"), "--ckpt",
                                      str(other), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "different class counts", "other_classes.pt")
    result = CliRunner().invoke(app, ["instability", "--run", str(three_epoch_run), "--layer", "3", "--max-images",
                                      "2", "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "--layer 3", "3 layers")
