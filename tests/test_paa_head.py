"""PAA auxiliary head: the 1-D two-component GMM (hand checks, recorded scikit-learn fits), the per-GT
top-k + GMM reassignment on hand-made scores, the head's losses against an independent recomputation,
empty / padded images, and a smoke training run."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from codetr.models.co_detr.box_coder import DeltaXYWHCoder
from codetr.models.co_detr.heads.gmm import fit_gaussian_mixture_1d
from codetr.models.co_detr.heads.paa import PAAHead, paa_reassign, select_candidates
from tests.head_training import make_inputs


# ---------------------------------------------------------------------------------------------- GMM


def test_gmm_recovers_well_separated_clusters():
    # 20 values around 1 and 10 around 5: EM ends with (numerically) hard responsibilities, so its
    # parameters are the clusters' own weights, means and biased variances (+ reg_covar 1e-6).
    generator = torch.Generator().manual_seed(0)
    low = 1.0 + 0.1 * torch.randn(20, generator=generator, dtype=torch.float64)
    high = 5.0 + 0.2 * torch.randn(10, generator=generator, dtype=torch.float64)
    values = torch.cat((high[:5], low, high[5:]))[None]  # order does not matter
    fit = fit_gaussian_mixture_1d(values)
    assert bool(fit.converged[0])
    expected_means = torch.tensor([[low.mean(), high.mean()]], dtype=torch.float64)
    expected_vars = torch.tensor([[low.var(unbiased=False), high.var(unbiased=False)]], dtype=torch.float64) + 1e-6
    # tolerance 1e-9: responsibilities of the other cluster are below exp(-100)
    torch.testing.assert_close(fit.weights, torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.means, expected_means, rtol=0, atol=1e-9)
    torch.testing.assert_close(fit.variances, expected_vars, rtol=0, atol=1e-9)
    assert fit.predict(values).tolist() == [[1] * 5 + [0] * 20 + [1] * 5]


def test_gmm_first_step_starts_from_mmdet_init():
    # mmdet's init: means (min, max), precisions 1 (variances 1), weights 0.5. One EM step from there,
    # worked in plain Python: responsibilities r_ik ∝ 0.5 N(x_i | mu_k, 1), then weighted moments.
    xs = [0.2, 0.5, 0.9, 2.0, 2.6]
    mus = [min(xs), max(xs)]
    resp = []
    for x in xs:
        dens = [0.5 * math.exp(-0.5 * (x - mu) ** 2) for mu in mus]
        resp.append([d / sum(dens) for d in dens])
    mass = [sum(r[k] for r in resp) for k in range(2)]
    means = [sum(r[k] * x for r, x in zip(resp, xs)) / mass[k] for k in range(2)]
    variances = [sum(r[k] * (x - means[k]) ** 2 for r, x in zip(resp, xs)) / mass[k] + 1e-6 for k in range(2)]
    fit = fit_gaussian_mixture_1d(torch.tensor([xs]), max_iter=1)
    assert fit.num_iters.tolist() == [1] and not bool(fit.converged[0])
    # tolerance 1e-6: the input is float32 (as PAA's losses), the hand computation float64
    torch.testing.assert_close(fit.weights[0], torch.tensor([m / len(xs) for m in mass], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(fit.means[0], torch.tensor(means, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(fit.variances[0], torch.tensor(variances, dtype=torch.float64), rtol=0, atol=1e-6)


# Recorded with scikit-learn 1.9.1: GaussianMixture(2, covariance_type="diag", weights_init=[.5, .5],
# means_init=[[min], [max]], precisions_init=[[1.], [1.]]).fit(X) on X = SKLEARN_X (float64), i.e. mmdet
# PAAHead's call. Full fit (31 iterations) and a fit with max_iter=1.
SKLEARN_X = [0.21, 0.35, 0.38, 0.52, 0.60, 0.74, 0.95, 1.10, 1.31, 1.62, 1.70, 2.05, 2.40, 3.10]
SKLEARN_FIT = dict(
    weights=[0.37579554475381627, 0.6242044552461837],
    means=[0.47270373711462627, 1.6641800684083892],
    variances=[0.03620989237409958, 0.553410190481045],
    num_iters=31,
    predict=[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
    score_samples=[-1.040330802294033, -0.3420940505076216, -0.25470712706654863, -0.14333164934974837,
                   -0.28738279539926215, -0.801876944425199, -1.4062913072142553, -1.3683568770131473,
                   -1.2075600800838209, -1.0961514166186472, -1.0955471812447835, -1.22887862062772,
                   -1.5835648541545106, -2.957001710193324],
)
SKLEARN_ONE_STEP = dict(
    weights=[0.685125292440331, 0.314874707559669],
    means=[0.8169776240354751, 2.0855804613001987],
    variances=[0.2677817038661468, 0.5126006082037343],
)


def test_gmm_matches_recorded_scikit_learn_fit():
    values = torch.tensor([SKLEARN_X], dtype=torch.float64)
    fit = fit_gaussian_mixture_1d(values)
    # tolerance 1e-9: both float64, same updates and stopping rule (tol 1e-3 on the mean log-likelihood)
    for name in ("weights", "means", "variances"):
        torch.testing.assert_close(getattr(fit, name)[0], torch.tensor(SKLEARN_FIT[name], dtype=torch.float64),
                                   rtol=0, atol=1e-9)
    assert fit.num_iters.tolist() == [SKLEARN_FIT["num_iters"]] and bool(fit.converged[0])
    assert fit.predict(values)[0].tolist() == SKLEARN_FIT["predict"]
    torch.testing.assert_close(fit.score_samples(values)[0],
                               torch.tensor(SKLEARN_FIT["score_samples"], dtype=torch.float64), rtol=0, atol=1e-9)
    one = fit_gaussian_mixture_1d(values, max_iter=1)
    for name in ("weights", "means", "variances"):
        torch.testing.assert_close(getattr(one, name)[0], torch.tensor(SKLEARN_ONE_STEP[name], dtype=torch.float64),
                                   rtol=0, atol=1e-9)


def test_gmm_matches_scikit_learn_on_random_rows():
    skm = pytest.importorskip("sklearn.mixture")  # optional: not a dependency of the project
    import numpy as np

    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = (torch.rand(int(torch.randint(3, 40, (1,), generator=generator)), generator=generator,
                        dtype=torch.float64) * 3).sort().values
        ref = skm.GaussianMixture(2, covariance_type="diag", weights_init=np.array([0.5, 0.5]),
                                  means_init=np.array([[x.min().item()], [x.max().item()]]),
                                  precisions_init=np.array([[1.0], [1.0]])).fit(x.numpy()[:, None])
        fit = fit_gaussian_mixture_1d(x[None])
        torch.testing.assert_close(fit.means[0], torch.from_numpy(ref.means_[:, 0]), rtol=0, atol=1e-8)
        assert fit.predict(x[None])[0].tolist() == ref.predict(x.numpy()[:, None]).tolist()


def test_gmm_rows_are_independent_fits():
    # a batched fit with padding equals each row's own fit (rows converge after different iterations)
    rows = [torch.tensor(SKLEARN_X, dtype=torch.float64), torch.tensor([0.1, 0.2, 4.0, 4.2, 4.1], dtype=torch.float64),
            torch.tensor([1.0, 1.5], dtype=torch.float64)]
    width = max(len(r) for r in rows)
    values = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, :len(r)], mask[i, :len(r)] = r, True
    values[2, 2:] = 100.0  # padding values must not leak into the fit
    batched = fit_gaussian_mixture_1d(values, mask)
    for i, r in enumerate(rows):
        single = fit_gaussian_mixture_1d(r[None])
        assert batched.num_iters[i] == single.num_iters[0]
        for name in ("weights", "means", "variances"):
            torch.testing.assert_close(getattr(batched, name)[i], getattr(single, name)[0], rtol=0, atol=1e-12)
    assert len(set(batched.num_iters.tolist())) > 1


# ------------------------------------------------------------------------------- reassignment


def test_select_candidates_keeps_topk_per_gt_and_level():
    gt_index = torch.tensor([0, 0, 0, 0, 1, 0, 0, 1])
    level = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    scores = torch.tensor([0.5, 0.2, 0.9, 0.2, 0.3, 0.1, 0.7, 0.4])
    kept = select_candidates(gt_index, level, scores, topk=2)
    # GT 0, level 0: scores 0.5, 0.2, 0.9, 0.2 -> the two 0.2 (tie: lower index first); level 1: 0.1, 0.7.
    # Sorted per GT by score: 5 (0.1), 1 (0.2), 3 (0.2), 6 (0.7); then GT 1: 4 (0.3), 7 (0.4).
    assert kept.tolist() == [5, 1, 3, 6, 4, 7]


def test_paa_reassign_hand_example():
    # 10 anchors on level 0, 6 on level 1; topk 3.
    gt_inds = torch.zeros(16, dtype=torch.long)
    scores = torch.full((16,), 99.0)  # scores of anchors that are not pre-assigned positives are never read
    # GT 1: level 0 anchors 0-3, level 1 anchors 10, 11
    for anchor, score in [(0, 0.15), (1, 0.10), (2, 3.0), (3, 0.12), (10, 2.0), (11, 2.2)]:
        gt_inds[anchor], scores[anchor] = 1, score
    gt_inds[5], scores[5] = 2, 0.05  # GT 2: a single candidate -> no GMM, no positive (as mmdet)
    gt_inds[6] = -1  # ignored stays ignored
    result = paa_reassign(gt_inds, scores, [10, 6], topk=3)
    # GT 1's candidates: level 0 keeps 0.10, 0.12, 0.15 (anchor 2, score 3.0, is not among the 3 lowest),
    # level 1 keeps 2.0, 2.2. The GMM puts {0.10, 0.12, 0.15} in component 0; its highest density is at
    # the value nearest their mean 0.1233, i.e. 0.12, so the positives are the prefix 0.10, 0.12
    # (anchors 1 and 3); anchor 0 (0.15) is cut by the separation rule.
    expected = torch.zeros(16, dtype=torch.long)
    expected[[1, 3]] = 1
    expected[6] = -1
    assert result.tolist() == expected.tolist()
    assert gt_inds[0] == 1  # the input is not modified


def test_paa_reassign_uses_mixture_density_prefix():
    # The recorded scikit-learn fit above puts the 6 lowest values in component 0 and its highest
    # log-density (-0.143) at the 4th value: PAA keeps the 4 lowest-score candidates.
    values = torch.tensor(SKLEARN_X)
    order = torch.tensor([3, 0, 13, 7, 1, 10, 5, 2, 12, 4, 8, 6, 11, 9])  # shuffled anchor positions
    gt_inds = torch.ones(14, dtype=torch.long)
    scores = torch.empty(14)
    scores[order] = values
    result = paa_reassign(gt_inds, scores, [14], topk=14)
    assert sorted(torch.nonzero(result == 1).flatten().tolist()) == sorted(order[:4].tolist())
    assert (result[order[4:]] == 0).all()


def test_paa_reassign_without_positives():
    gt_inds = torch.tensor([0, 0, -1, 0])
    assert paa_reassign(gt_inds, torch.zeros(4), [2, 2], topk=9).tolist() == [0, 0, -1, 0]
    with pytest.raises(ValueError, match="num_level_anchors sums to 3"):
        paa_reassign(gt_inds, torch.zeros(4), [2, 1], topk=9)


# --------------------------------------------------------------------------------------- head


def brute_force_max_iou(anchors, gt_boxes, thr=0.1):
    """MaxIoU(pos = neg = thr, min_pos_iou 0, all ties) with plain loops over GTs."""
    iou = box_iou(anchors, gt_boxes)
    best_iou, best_gt = iou.max(dim=1)
    gt_inds = torch.where(best_iou >= thr, best_gt + 1, torch.zeros_like(best_gt))
    for j in range(gt_boxes.shape[0]):  # later GTs override earlier ones, as mmdet's loop
        gt_inds[iou[:, j] == iou[:, j].max()] = j + 1
    return gt_inds


def test_losses_and_candidates_against_recomputation():
    torch.manual_seed(0)
    head = PAAHead(num_classes=4, in_channels=32, num_convs=1)
    assert head.kind == "paa" and head.num_anchors == 1
    assert head.loss_weights == {"loss_cls": 1.0, "loss_bbox": 1.3, "loss_iou": 0.5}
    inputs = make_inputs(image_sizes=torch.tensor([[128, 128], [100, 60]]),
                         boxes=[torch.tensor([[10.0, 12.0, 60.0, 50.0], [40.0, 30.0, 120.0, 126.0]]),
                                torch.tensor([[5.0, 5.0, 50.0, 90.0]])],
                         labels=[torch.tensor([1, 3]), torch.tensor([2])])
    out = head(inputs)
    assert set(out.losses) == set(head.loss_weights)

    logits, deltas, iou_logits = head.predict(inputs.maps)
    anchors, counts = head.anchors(inputs.maps)
    # level 1 (stride 16), cell (x=2, y=1): a 128-px square centred on (32, 16)
    torch.testing.assert_close(anchors[256 + 8 + 2], torch.tensor([32 - 64.0, 16 - 64.0, 32 + 64.0, 16 + 64.0]))
    features = torch.cat([m.flatten(2).transpose(1, 2) for m in inputs.maps], 1)
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    focal_sum, num_pos, giou_terms, iou_targets, bce_terms = 0.0, 0, [], [], []
    for image, cand in enumerate(out.candidates):
        h, w = inputs.image_sizes[image].tolist()
        centres = 0.5 * (anchors[:, :2] + anchors[:, 2:])
        valid = (centres[:, 0] < w) & (centres[:, 1] < h)
        torch.testing.assert_close(cand.boxes, anchors[valid])
        torch.testing.assert_close(cand.features_of(torch.arange(len(cand.boxes))), features[image][valid])
        gt_boxes, gt_labels = inputs.gt_boxes[image], inputs.gt_labels[image]
        # independent scores of the pre-assigned positives: torchvision focal + GIoU
        pre = brute_force_max_iou(anchors[valid], gt_boxes)
        pre_pos = pre > 0
        matched = pre[pre_pos] - 1
        onehot = F.one_hot(gt_labels[matched], 4).float()
        decoded = coder.decode(anchors[valid][pre_pos], deltas[image][valid][pre_pos]).detach()
        giou = torch.diag(generalized_box_iou(decoded, gt_boxes[matched]))
        scores = torch.zeros(int(valid.sum()))
        scores[pre_pos] = (sigmoid_focal_loss(logits[image][valid][pre_pos].detach(), onehot, reduction="none").sum(-1)
                           + 1.3 * (1 - giou))
        final = paa_reassign(pre, scores, [int(v.sum()) for v in valid.split(counts)], topk=9)
        pos = final > 0
        assert torch.equal(cand.positive, pos) and pos.any()
        assert pos.sum() < pre_pos.sum()  # the GMM really drops candidates
        assert cand.num_gt == len(gt_boxes)
        gt_index = final[pos] - 1
        assert torch.equal(cand.labels[pos], gt_labels[gt_index])
        assert (cand.labels[~pos] == 4).all()
        assert torch.equal(cand.target_boxes[pos], gt_boxes[gt_index])

        targets = F.one_hot(cand.labels, 5)[:, :4].float()
        focal_sum = focal_sum + sigmoid_focal_loss(logits[image][valid], targets, reduction="sum")
        num_pos += int(pos.sum())
        pred = coder.decode(anchors[valid][pos], deltas[image][valid][pos])
        iou = torch.diag(box_iou(pred.detach(), gt_boxes[gt_index]))
        iou_targets.append(iou)
        giou_terms.append(1 - torch.diag(generalized_box_iou(pred, gt_boxes[gt_index])))
        bce_terms.append(F.binary_cross_entropy_with_logits(iou_logits[image][valid][pos], iou, reduction="none"))
    iou_targets = torch.cat(iou_targets)
    # tolerance: float32 sums over a few hundred anchors
    torch.testing.assert_close(out.losses["loss_cls"], focal_sum / max(num_pos, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_bbox"], (torch.cat(giou_terms) * iou_targets).sum() / iou_targets.sum(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_iou"], torch.cat(bce_terms).sum() / num_pos, rtol=1e-5, atol=1e-6)


def test_gt_with_a_single_candidate_gets_no_positive():
    # A 4x4 box overlaps every anchor with IoU < 0.1: it is pre-assigned only through low-quality
    # matches, all on level 0 (the smallest anchors give its best IoU). With topk 1 it has one
    # candidate, too few for the GMM, so it ends with no positive; the large box keeps positives.
    head = PAAHead(num_classes=3, in_channels=32, topk=1)
    boxes = torch.tensor([[50.0, 50.0, 54.0, 54.0], [10.0, 10.0, 110.0, 100.0]])
    inputs = make_inputs(boxes=[boxes, boxes[1:]], labels=[torch.tensor([0, 1]), torch.tensor([1])])
    anchors, counts = head.anchors(inputs.maps)
    pre = head.assigner.assign(anchors, boxes, torch.tensor([0, 1]))
    tiny = torch.nonzero(pre.gt_inds == 1).flatten()
    assert len(tiny) > 1 and (tiny < counts[0]).all()  # several pre-assigned anchors, all on level 0
    cand = head(inputs).candidates[0]
    assert not (cand.positive & (cand.target_boxes == boxes[0]).all(-1)).any()
    assert (cand.labels == 1).sum() >= 1


@pytest.mark.parametrize("num_convs", [0, 2])
def test_image_without_boxes(num_convs):
    head = PAAHead(num_classes=3, in_channels=32, num_convs=num_convs)
    inputs = make_inputs(boxes=[torch.zeros(0, 4), torch.tensor([[20.0, 20.0, 70.0, 90.0]])],
                         labels=[torch.zeros(0, dtype=torch.int64), torch.tensor([2])])
    for m in inputs.maps:
        m.requires_grad_(True)
    out = head(inputs)
    assert out.candidates[0].num_positives == 0 and out.candidates[0].num_gt == 0
    assert (out.candidates[0].labels == 3).all()
    assert out.candidates[1].num_positives > 0
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert inputs.maps[0].grad is not None
    # no boxes anywhere: box terms are exact zeros, classification still pushes every score down
    empty = head(make_inputs(boxes=[torch.zeros(0, 4)] * 2, labels=[torch.zeros(0, dtype=torch.int64)] * 2))
    assert empty.losses["loss_bbox"].item() == 0.0 and empty.losses["loss_iou"].item() == 0.0
    assert empty.losses["loss_cls"].item() > 0
    assert all(c.num_positives == 0 for c in empty.candidates)
