"""HungarianMatcher against brute force over all assignments and a hand-checked example."""

import itertools
import math

import pytest
import torch

from codetr.models.matcher import HungarianMatcher, match_cost_matrix


def _brute_force_min_cost(cost: torch.Tensor) -> float:
    """Minimum total cost over all injective maps of the smaller side into the larger one."""
    num_rows, num_cols = cost.shape
    if num_rows == 0 or num_cols == 0:
        return 0.0
    if num_rows <= num_cols:
        return min(
            sum(cost[r, c].item() for r, c in enumerate(cols))
            for cols in itertools.permutations(range(num_cols), num_rows)
        )
    return min(
        sum(cost[r, c].item() for c, r in enumerate(rows))
        for rows in itertools.permutations(range(num_rows), num_cols)
    )


@pytest.mark.parametrize("num_queries", range(1, 7))
def test_assignment_reaches_brute_force_minimum(num_queries: int) -> None:
    g = torch.Generator().manual_seed(num_queries)
    # N in 0..Q, plus Q < N (more targets than queries)
    for num_targets in list(range(num_queries + 1)) + [num_queries + 1, num_queries + 2]:
        cost = torch.randn(num_queries, num_targets, generator=g, dtype=torch.float64)
        rows, cols = match_cost_matrix(cost)
        expected_len = min(num_queries, num_targets)
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == expected_len
        assert len(set(rows.tolist())) == expected_len and len(set(cols.tolist())) == expected_len
        assert rows.tolist() == sorted(rows.tolist())
        total = cost[rows, cols].sum().item()
        assert math.isclose(total, _brute_force_min_cost(cost), abs_tol=1e-6)  # atol 1e-6


def test_non_finite_cost_raises_value_error() -> None:
    cost = torch.zeros(3, 2)
    cost[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite matching cost"):
        match_cost_matrix(cost)


def _random_batch(g: torch.Generator, sizes: list[int], num_queries: int = 7, num_classes: int = 5):
    batch_size = len(sizes)
    logits = torch.randn(batch_size, num_queries, num_classes, generator=g) * 2
    boxes = torch.rand(batch_size, num_queries, 4, generator=g) * 0.4 + 0.1
    targets = [
        {
            "labels": torch.randint(num_classes, (n,), generator=g),
            "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.1,
        }
        for n in sizes
    ]
    return logits, boxes, targets


def test_batched_equals_per_image_and_empty_targets() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [3, 0, 9, 1]  # includes an image without targets and one with more targets than queries
    logits, boxes, targets = _random_batch(g, sizes)
    matcher = HungarianMatcher()
    batched = matcher(logits, boxes, targets)
    assert len(batched) == len(sizes)
    for i, (rows, cols) in enumerate(batched):
        single_rows, single_cols = matcher(logits[i : i + 1], boxes[i : i + 1], [targets[i]])[0]
        assert torch.equal(rows, single_rows) and torch.equal(cols, single_cols)
        assert len(rows) == min(7, sizes[i])
        assert rows.dtype == torch.int64 and cols.dtype == torch.int64
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0
    # all images empty
    all_empty = matcher(logits[:2], boxes[:2], [targets[1], targets[1]])
    assert all(r.numel() == 0 and c.numel() == 0 for r, c in all_empty)


def test_full_forward_hand_checked_2x2() -> None:
    # Two queries, two targets. Query 0 sits exactly on target 1 and query 1 exactly on target 0,
    # and the class scores agree, so the identity assignment is clearly worse.
    logit = math.log(0.9 / 0.1)  # p = 0.9 for the predicted class
    logits = torch.full((1, 2, 3), -logit)  # p = 0.1 elsewhere
    logits[0, 0, 2] = logit
    logits[0, 1, 0] = logit
    box_a = [0.3, 0.3, 0.2, 0.2]
    box_b = [0.7, 0.6, 0.2, 0.4]
    boxes = torch.tensor([[box_b, box_a]])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([box_a, box_b])}]

    # Hand-computed cost matrix (cost_class=2, cost_bbox=5, cost_giou=2, alpha=.25, gamma=2):
    # focal class cost for p: 0.25*(1-p)^2*(-ln p) - 0.75*p^2*(-ln(1-p))
    def focal_cost(p: float) -> float:
        return 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)

    # boxes a and b: L1 = 0.4 + 0.3 + 0 + 0.2 = 0.9. In xyxy a = (.2,.2,.4,.4), b = (.6,.4,.8,.8):
    # disjoint, union = 0.04 + 0.08 = 0.12, enclosing (.2,.2,.8,.8) = 0.36, GIoU = -(0.24 / 0.36).
    giou_ab = -(0.36 - 0.12) / 0.36
    matched = 2 * focal_cost(0.9) + 5 * 0.0 - 2 * 1.0
    unmatched = 2 * focal_cost(0.1) + 5 * 0.9 - 2 * giou_ab
    expected_cost = torch.tensor([[unmatched, matched], [matched, unmatched]])

    matcher = HungarianMatcher()
    cost = matcher.batch_cost(logits, boxes, targets)
    torch.testing.assert_close(cost[0], expected_cost, atol=1e-5, rtol=0)  # float32 arithmetic
    assert matched < unmatched  # so the swap (total 2 * matched) must win

    (rows, cols), = matcher(logits, boxes, targets)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def test_forward_raises_on_nan_predictions() -> None:
    g = torch.Generator().manual_seed(1)
    logits, boxes, targets = _random_batch(g, [2, 2])
    boxes[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite matching cost"):
        HungarianMatcher()(logits, boxes, targets)
