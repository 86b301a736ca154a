"""The criterion of Sec. 4.1 against independent computations and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hcformer.config import build_config
from hcformer.losses import (
    HungarianMatcher,
    LossNorm,
    PerPixelCriterion,
    SetCriterion,
    build_criterion,
    local_norm,
    pairwise_dice,
    pairwise_sigmoid_ce,
    point_sample,
    summarize,
)
from hcformer.losses.point_sampling import importance_draws, importance_points

torch.set_num_threads(1)


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_point_sample_hits_pixel_centres_exactly():
    values = torch.arange(24.0).reshape(1, 2, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    coords = torch.stack([(xs.flatten() + 0.5) / 4, (ys.flatten() + 0.5) / 3], -1)[None]
    out = point_sample(values, coords)
    torch.testing.assert_close(out, values.flatten(2), rtol=0, atol=1e-5)


def test_importance_points_prefer_uncertain_region():
    logits = torch.full((1, 1, 32, 32), 10.0)
    logits[..., :, 16:] = 0.0  # right half maximally uncertain

    def points(generator: torch.Generator) -> torch.Tensor:
        ratios = {"oversample_ratio": 3.0, "importance_sample_ratio": 0.75}
        draws = importance_draws(1, num_points=200, generator=generator, device="cpu", **ratios)
        return importance_points(logits, draws, num_points=200)

    pts = points(gens(1)[0])
    assert pts.shape == (1, 200, 2)
    assert (pts[0, :150, 0] >= 0.5 - 1 / 64).all()  # the 150 most uncertain lie on the right half
    assert torch.equal(pts, points(gens(1)[0]))  # keyed by the generator only


def test_pairwise_costs_match_per_pair_definitions():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    targets = (torch.rand(3, 50) > 0.5).float()
    ce = pairwise_sigmoid_ce(logits, targets)
    dice = pairwise_dice(logits, targets)
    for q in range(4):
        for n in range(3):
            ref = F.binary_cross_entropy_with_logits(logits[q], targets[n])
            assert ce[q, n] == pytest.approx(float(ref), rel=1e-5)
            p = logits[q].sigmoid()
            ref_dice = 1 - (2 * (p * targets[n]).sum() + 1) / (p.sum() + targets[n].sum() + 1)
            assert dice[q, n] == pytest.approx(float(ref_dice), rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_matcher_equals_brute_force(seed):
    torch.manual_seed(seed)
    q, n, k = 5, 3, 4
    logits = torch.randn(1, q, k + 1)
    masks = torch.randn(1, q, 8, 8)
    target = {"labels": torch.randint(0, k, (n,)), "masks": torch.rand(n, 32, 32) > 0.5}
    matcher = HungarianMatcher(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=64)
    cost = matcher.cost_matrix(
        logits[0], masks[0], target["labels"], target["masks"], generator=gens(1)[0]
    )
    # The class part of the cost by its definition: -2 p(c).
    probs = logits[0].softmax(-1)
    coords = torch.rand(1, 64, 2, generator=gens(1)[0])
    out = point_sample(masks[0][:, None], coords.expand(q, -1, -1))[:, 0]
    tgt = point_sample(target["masks"][:, None].float(), coords.expand(n, -1, -1))[:, 0]
    for i in range(q):
        for j in range(n):
            ref = (
                -2 * probs[i, target["labels"][j]]
                + 5 * F.binary_cross_entropy_with_logits(out[i], tgt[j])
                + 5
                * (
                    1
                    - (2 * (out[i].sigmoid() * tgt[j]).sum() + 1)
                    / (out[i].sigmoid().sum() + tgt[j].sum() + 1)
                )
            )
            assert cost[i, j] == pytest.approx(float(ref), rel=1e-4, abs=1e-5)
    ((rows, cols),) = matcher(logits, masks, [target], gens(1))
    best = min(
        sum(float(cost[perm[j], j]) for j in range(n))
        for perm in itertools.permutations(range(q), n)
    )
    assert sum(float(cost[r, c]) for r, c in zip(rows, cols)) == pytest.approx(best, rel=1e-6)
    assert sorted(cols.tolist()) == list(range(n))


def test_matcher_batch_equals_image_by_image():
    """The batched forward (one sampling pass for all images) draws each image's points from
    its own generator and gives each image the assignment of its own cost matrix; an image
    without targets gets empty indices and draws nothing."""
    torch.manual_seed(0)
    q, k = 6, 4
    logits, masks = torch.randn(3, q, k + 1), torch.randn(3, q, 8, 8)
    targets = [
        {"labels": torch.randint(0, k, (n,)), "masks": torch.rand(n, 32, 32) > 0.5}
        for n in (3, 0, 5)
    ]
    matcher = HungarianMatcher(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, num_points=64)
    got = matcher(logits, masks, targets, gens(3))
    assert [len(r) for r, _ in got] == [3, 0, 5]
    for b in (0, 2):
        cost = matcher.cost_matrix(
            logits[b], masks[b], targets[b]["labels"], targets[b]["masks"], generator=gens(3)[b]
        )
        rows, cols = linear_sum_assignment(cost.numpy())
        assert got[b][0].tolist() == rows.tolist() and got[b][1].tolist() == cols.tolist()


def blocky_target():
    """Two masks on a 32x32 image aligned to 4x4 blocks, and logits at stride 4 that match."""
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16, :16] = True
    masks[1, 16:, 8:] = True
    small = F.interpolate(masks[:, None].float(), size=(8, 8), mode="nearest")[:, 0]
    return masks, small


def test_perfect_prediction_gives_near_zero_mask_loss_and_hand_made_class_loss(make_criterion):
    masks, _ = blocky_target()
    labels = torch.tensor([0, 2])
    q, k = 3, 3
    # Logits at the target's resolution (the loss does not care about the stride); uniform
    # points, so that only the thin band where bilinear sampling blurs a border costs anything.
    pred_masks = torch.full((1, q, 32, 32), -6.0)
    pred_masks[0, 0] = masks[1].float() * 12 - 6  # query 0 predicts target 1
    pred_masks[0, 2] = masks[0].float() * 12 - 6  # query 2 predicts target 0
    pred_logits = torch.zeros(1, q, k + 1)
    pred_logits[0, 0, 2] = 8.0
    pred_logits[0, 2, 0] = 8.0
    pred_logits[0, 1, 3] = 1.0  # query 1: mildly "no object"
    crit = make_criterion(num_classes=k, num_points=2048, importance_sample_ratio=0.0)
    out = crit(
        {"pred_logits": pred_logits, "pred_masks": pred_masks, "cluster_scales": []},
        [{"labels": labels, "masks": masks}],
        generators=gens(1),
    )
    assert float(out["loss_mask"]) < 5 * 0.08  # a random guess costs ~5 * 0.7
    assert float(out["loss_dice"]) < 5 * 0.04
    wrong = crit(
        {"pred_logits": pred_logits, "pred_masks": -pred_masks, "cluster_scales": []},
        [{"labels": labels, "masks": masks}],
        generators=gens(1),
    )
    assert float(wrong["loss_mask"] + wrong["loss_dice"]) > 10 * float(
        out["loss_mask"] + out["loss_dice"]
    )

    # Class loss by hand: weighted mean of the three queries' cross-entropies.
    def ce(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    rows = pred_logits[0].tolist()
    terms = [(1.0, ce(rows[0], 2)), (0.1, ce(rows[1], 3)), (1.0, ce(rows[2], 0))]
    expected = 2.0 * sum(w * v for w, v in terms) / sum(w for w, _ in terms)
    assert float(out["loss_ce"]) == pytest.approx(expected, rel=1e-5)
    assert "loss_reg" not in out


def test_deep_supervision_and_regulariser(make_criterion):
    masks, small = blocky_target()
    torch.manual_seed(0)
    pred = {
        "pred_logits": torch.randn(2, 4, 4),
        "pred_masks": torch.randn(2, 4, 8, 8),
        "aux_outputs": [
            {"pred_logits": torch.randn(2, 4, 4), "pred_masks": torch.randn(2, 4, 8, 8)}
            for _ in range(2)
        ],
        "cluster_scales": [torch.tensor(0.1), torch.tensor(-0.3)],
    }
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": masks},
        {"labels": torch.tensor([1]), "masks": masks[:1]},
    ]
    out = make_criterion()(pred, targets, generators=gens(2))
    assert set(out) == {
        *(f"loss_{t}{s}" for t in ("ce", "mask", "dice") for s in ("", "_0", "_1")),
        "loss_reg",
    }
    # The authors' |sum s| (not sum |s|): 0.1 * |0.1 - 0.3|.
    assert float(out["loss_reg"]) == pytest.approx(0.1 * 0.2)
    # An aux set equal to the final one gives the same terms (same generators: same points).
    same = dict(
        pred, aux_outputs=[{"pred_logits": pred["pred_logits"], "pred_masks": pred["pred_masks"]}]
    )
    out2 = make_criterion()(same, targets, generators=gens(2))
    for t in ("ce", "mask", "dice"):
        assert float(out2[f"loss_{t}"]) == pytest.approx(float(out[f"loss_{t}"]))
    no_ds = make_criterion(deep_supervision=False)(pred, targets, generators=gens(2))
    assert "loss_ce_0" not in no_ds
    totals = summarize(out)
    assert totals["loss"] == pytest.approx(sum(float(v) for v in out.values()), rel=1e-6)
    assert totals["loss_ce"] == pytest.approx(
        sum(float(out[k]) for k in ("loss_ce", "loss_ce_0", "loss_ce_1"))
    )


def test_split_batch_with_global_norm_equals_whole_batch(make_criterion):
    """What DDP and gradient accumulation rely on: shares of the global loss add up."""
    masks, _ = blocky_target()
    torch.manual_seed(1)
    pred_logits = torch.randn(3, 4, 4, requires_grad=True)
    pred_masks = torch.randn(3, 4, 8, 8, requires_grad=True)
    scales = [torch.tensor(0.2, requires_grad=True)]
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": masks},
        {"labels": torch.tensor([1]), "masks": masks[1:]},
        {"labels": torch.tensor([], dtype=torch.int64), "masks": masks[:0]},
    ]
    crit = make_criterion()
    whole = sum(
        crit(
            {"pred_logits": pred_logits, "pred_masks": pred_masks, "cluster_scales": scales},
            targets,
            generators=gens(3),
        ).values()
    )
    norm = local_norm(targets, num_queries=4, no_object_weight=0.1)
    assert norm == LossNorm(3, 3, 3 + 9 * 0.1, 0)
    parts = 0
    for sl in (slice(0, 1), slice(1, 3)):
        g = gens(3)[sl]
        parts = parts + sum(
            crit(
                {
                    "pred_logits": pred_logits[sl],
                    "pred_masks": pred_masks[sl],
                    "cluster_scales": scales,
                },
                targets[sl],
                generators=g,
                norm=norm,
            ).values()
        )
    assert float(parts.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)
    grads_whole = torch.autograd.grad(whole, [pred_logits, pred_masks, *scales])
    grads_parts = torch.autograd.grad(parts, [pred_logits, pred_masks, *scales])
    for a, b in zip(grads_whole, grads_parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_per_pixel_cross_entropy_and_split():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[0, :3] = 255
    targets = [{"sem_seg": labels[0]}, {"sem_seg": labels[1]}]
    crit = PerPixelCriterion(reg_weight=0.1)
    out = crit({"sem_logits": logits, "cluster_scales": [torch.tensor(0.1)]}, targets)
    up = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, labels, ignore_index=255)
    assert float(out["loss_sem"]) == pytest.approx(float(ref), rel=1e-5)
    assert float(out["loss_reg"]) == pytest.approx(0.01)
    norm = crit.norm_for(targets)
    halves = sum(
        sum(
            crit(
                {"sem_logits": logits[i : i + 1], "cluster_scales": [torch.tensor(0.1)]},
                targets[i : i + 1],
                norm=norm,
            ).values()
        )
        for i in range(2)
    )
    assert float(halves) == pytest.approx(float(sum(out.values())), rel=1e-5)


def test_build_criterion_follows_head_type_and_weights():
    cfg = build_config(
        {"model": {"num_classes": 7}, "loss": {"num_points": 99, "no_object_weight": 0.2}}
    )
    crit = build_criterion(cfg)
    assert isinstance(crit, SetCriterion)
    assert crit.num_points == 99 and crit.matcher.num_points == 99
    assert crit.empty_weight.tolist() == pytest.approx([1.0] * 7 + [0.2])
    cfg = build_config({"model": {"head": {"type": "fpn"}}})
    assert isinstance(build_criterion(cfg), PerPixelCriterion)


def factorised_and_dense(b=3, q=6, cells=4, size=8, sets=3, seed=0):
    """The same prediction sets held densely and as coefficients over a shared basis."""
    torch.manual_seed(seed)
    basis = torch.randn(b, cells, size, size, requires_grad=True)
    coefficients = [torch.randn(b, q, cells, requires_grad=True) for _ in range(sets)]
    logits = [torch.randn(b, q, 4) for _ in range(sets)]
    # The reference: every query's dense map, formed pixel by pixel.
    dense = [torch.einsum("bqc,bchw->bqhw", c, basis) for c in coefficients]
    fact = [
        {"pred_logits": lg, "mask_coefficients": c, "mask_basis": basis}
        for lg, c in zip(logits, coefficients)
    ]
    full = [{"pred_logits": lg, "pred_masks": d} for lg, d in zip(logits, dense)]
    wrap = lambda s: {**s[-1], "aux_outputs": s[:-1], "cluster_scales": []}  # noqa: E731
    return wrap(fact), wrap(full), basis, coefficients


@pytest.mark.parametrize("empty_image", [False, True])
def test_factorised_masks_give_the_dense_losses_and_gradients(empty_image, make_criterion):
    """HCFormer's training sets of a small coarse map (coefficients over the decoded one-hot
    maps of the cells): the matcher, losses and gradients of the dense maps they stand for."""
    masks, _ = blocky_target()
    targets = [
        {"labels": torch.tensor([0, 2]), "masks": masks},
        {"labels": torch.tensor([1]), "masks": masks[1:]},
        {"labels": torch.tensor([2, 1]), "masks": masks.flip(0)},
    ]
    if empty_image:
        targets[1] = {"labels": torch.tensor([], dtype=torch.int64), "masks": masks[:0]}
    fact, full, basis, coefficients = factorised_and_dense()
    crit = make_criterion()
    for pred in (fact, *fact["aux_outputs"]):
        dense = torch.einsum("bqc,bchw->bqhw", pred["mask_coefficients"], basis)
        want = crit.matcher.cost_matrices(pred["pred_logits"], dense, targets, gens(3))
        got = crit.matcher.cost_matrices(
            pred["pred_logits"], pred["mask_coefficients"], targets, gens(3), mask_basis=basis
        )
        for w, g in zip(want, got):
            assert (w is None) == (g is None) == (w is None and empty_image)
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    got = crit(fact, targets, generators=gens(3))
    grads_got = torch.autograd.grad(sum(got.values()), [basis, *coefficients])
    want = crit(full, targets, generators=gens(3))
    grads_want = torch.autograd.grad(sum(want.values()), [basis, *coefficients])
    assert set(got) == set(want) and len(got) == 9
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    for g, w in zip(grads_got, grads_want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_factorised_masks_without_targets_and_mixed_sets(make_criterion):
    fact, full, basis, _ = factorised_and_dense(b=2)
    masks, _ = blocky_target()
    none = [{"labels": torch.tensor([], dtype=torch.int64), "masks": masks[:0]}] * 2
    out = make_criterion()(fact, none, generators=gens(2))
    # Zero mask terms that still reach the basis (DDP expects a gradient for every parameter).
    assert float(out["loss_mask"].detach()) == float(out["loss_dice"].detach()) == 0.0
    (g,) = torch.autograd.grad(sum(out.values()), [basis])
    assert torch.equal(g, torch.zeros_like(basis))
    mixed = dict(fact, aux_outputs=full["aux_outputs"])
    with pytest.raises(ValueError, match="either pred_masks or mask_coefficients"):
        make_criterion()(mixed, none, generators=gens(2))


def test_mask_loss_of_coarse_logits_is_grid_sample_on_them(make_criterion):
    """HCFormer at L < 3 hands the loss its masks at stride 32 / 2**L (here 16: 4 x 4 logits of
    a 64 x 64 image), as the authors' code: the BCE and dice are those of ``grid_sample`` of the
    coarse logits (align_corners=False) at the drawn normalised points, against the
    full-resolution targets sampled at the same points; nothing is upsampled first."""
    g = torch.Generator().manual_seed(7)
    q, n, p = 3, 2, 96
    coarse = torch.randn(1, q, 4, 4, generator=g) * 3
    masks = torch.zeros(n, 64, 64, dtype=torch.bool)
    masks[0, 5:40, 10:50] = True
    masks[1, 30:, :23] = True
    target = {"labels": torch.tensor([0, 1]), "masks": masks}
    logits = torch.randn(1, q, 3, generator=g)
    crit = make_criterion(
        num_classes=2, num_points=p, oversample_ratio=2.0, importance_sample_ratio=0.5
    )
    pred = {"pred_logits": logits, "pred_masks": coarse, "cluster_scales": []}
    got = crit(pred, [target], generators=gens(1, seed=11))

    # The reference draws from the image's generator in the documented order: the matcher's
    # p uniform points, then per matched mask 2p candidates and the p / 2 uniform extras.
    gen = gens(1, seed=11)[0]
    ((rows, cols),) = crit.matcher(logits, coarse, [target], [gen])
    candidates = torch.rand(n, 2 * p, 2, generator=gen)
    extra = torch.rand(n, p // 2, 2, generator=gen)
    src = coarse[0, rows][:, None]  # [n, 1, 4, 4]: the matched queries' coarse logits

    def sample(maps, points):  # [N, 1, H, W], [N, P, 2] in [0, 1] -> [N, P]
        grid = (2 * points - 1)[:, :, None]
        return F.grid_sample(maps, grid, align_corners=False)[:, 0, :, 0]

    uncertain = -sample(src, candidates).abs()
    top = uncertain.topk(p // 2, dim=1).indices
    points = torch.cat([candidates.gather(1, top[..., None].expand(-1, -1, 2)), extra], 1)
    x = sample(src, points)
    t = sample(masks[cols][:, None].float(), points)
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1).sum() / n
    dice = (1 - (2 * (x.sigmoid() * t).sum(1) + 1) / (x.sigmoid().sum(1) + t.sum(1) + 1)).sum()
    assert float(got["loss_mask"]) == pytest.approx(5 * float(bce), rel=1e-5)
    assert float(got["loss_dice"]) == pytest.approx(5 * float(dice) / n, rel=1e-5)
    # Upsampling the logits to stride 4 first (the former decoding) is a different loss.
    up = F.interpolate(coarse, scale_factor=4, mode="bilinear", align_corners=False)
    other = crit({**pred, "pred_masks": up}, [target], generators=gens(1, seed=11))
    assert abs(float(other["loss_mask"]) - float(got["loss_mask"])) > 1e-3
