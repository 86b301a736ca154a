"""The lean training step: the batched matcher and criterion give the numbers of a plain
per-set, per-image reference (same matches, same losses and gradients), and a training step
waits for the device only for the one copy of the matching costs."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from hcformer.losses import SetCriterion, summarize, summary_values
from hcformer.losses import criterion as criterion_module
from hcformer.losses.matcher import sample_targets

torch.set_num_threads(1)

K = 4  # classes (logits have K + 1 columns)


def gens(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(n)]


def sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``[N, 1, H, W]`` maps at ``[N, P, 2]`` points in [0, 1] -> ``[N, P]``."""
    grid = (2 * points - 1)[:, :, None]
    return F.grid_sample(maps, grid, align_corners=False)[:, 0, :, 0]


def reference(crit: SetCriterion, outputs: dict, targets: list[dict], generators):
    """The loss of Sec. 4.1 set by set and image by image, each cost entry by its definition,
    drawing from each image's generator in the documented order (per set: the matcher's
    points, then the candidates and extras of the matched masks). Returns the loss terms and
    every set's per-image ``(queries, targets)``."""
    sets = [outputs, *(outputs.get("aux_outputs", []) if crit.deep_supervision else [])]
    b_size, q_size = outputs["pred_logits"].shape[:2]
    p = crit.num_points
    num_masks = max(sum(len(t["labels"]) for t in targets), 1)
    matched_n = [min(len(t["labels"]), q_size) for t in targets]
    weight_sum = sum(m + (q_size - m) * 0.1 for m in matched_n)
    losses, matches = {}, []
    for s, pred in enumerate(sets):
        if "pred_masks" in pred:
            dense = pred["pred_masks"]
        else:
            dense = torch.einsum("bqc,bchw->bqhw", pred["mask_coefficients"], pred["mask_basis"])
        per_image = []
        ce = bce = dice = 0.0
        for b, t in enumerate(targets):
            n = len(t["labels"])
            g = generators[b]
            rows, cols = np.zeros(0, np.int64), np.zeros(0, np.int64)
            if n:
                pts = torch.rand(1, p, 2, generator=g)
                with torch.no_grad():
                    x = sample(dense[b][:, None].float(), pts.expand(q_size, -1, -1))
                    y = sample(t["masks"][:, None].float(), pts.expand(n, -1, -1))
                    probs = pred["pred_logits"][b].float().softmax(-1)
                    cost = torch.empty(q_size, n)
                    for i in range(q_size):
                        for j in range(n):
                            bce_ij = F.binary_cross_entropy_with_logits(x[i], y[j])
                            pi = x[i].sigmoid()
                            dice_ij = 1 - (2 * (pi * y[j]).sum() + 1) / (pi.sum() + y[j].sum() + 1)
                            cost[i, j] = -2 * probs[i, t["labels"][j]] + 5 * bce_ij + 5 * dice_ij
                rows, cols = linear_sum_assignment(cost.numpy())
            per_image.append((rows.tolist(), cols.tolist()))
            # Class loss of this image's queries.
            classes = torch.full((q_size,), K)
            classes[torch.as_tensor(rows, dtype=torch.int64)] = t["labels"][
                torch.as_tensor(cols, dtype=torch.int64)
            ]
            weight = torch.where(classes == K, 0.1, 1.0)
            logp = pred["pred_logits"][b].float().log_softmax(-1)
            ce = ce + (weight * -logp[torch.arange(q_size), classes]).sum()
            # Mask losses of its matched masks, on importance-sampled points.
            m = len(rows)
            cand = torch.rand(m, int(p * 3.0), 2, generator=g)
            extra = torch.rand(m, p - int(0.75 * p), 2, generator=g)
            for i, (r, c) in enumerate(zip(rows, cols)):
                src = dense[b, r][None, None].float()
                uncertain = -sample(src.detach(), cand[i : i + 1]).abs()
                top = uncertain.topk(p - extra.shape[1], dim=1).indices[0]
                points = torch.cat([cand[i, top], extra[i]])[None]
                x = sample(src, points)[0]
                y = sample(t["masks"][c][None, None].float(), points)[0]
                bce = bce + F.binary_cross_entropy_with_logits(x, y)
                px = x.sigmoid()
                dice = dice + 1 - (2 * (px * y).sum() + 1) / (px.sum() + y.sum() + 1)
        suffix = "" if s == 0 else f"_{s - 1}"
        losses["loss_ce" + suffix] = 2 * ce / weight_sum
        losses["loss_mask" + suffix] = 5 * torch.as_tensor(bce) / num_masks
        losses["loss_dice" + suffix] = 5 * torch.as_tensor(dice) / num_masks
        matches.append(per_image)
    return losses, matches


def dense_outputs(b, q, size, sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: {  # noqa: E731
        "pred_logits": (torch.randn(b, q, K + 1, generator=g) * 2).requires_grad_(),
        "pred_masks": (torch.randn(b, q, size, size, generator=g) * 3).requires_grad_(),
    }
    final, *aux = [mk() for _ in range(sets)]
    return {**final, "aux_outputs": aux, "cluster_scales": []}


def factorised_outputs(b, q, cells, size, sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(b, cells, size, size, generator=g).requires_grad_()
    mk = lambda: {  # noqa: E731
        "pred_logits": torch.randn(b, q, K + 1, generator=g) * 2,
        "mask_coefficients": (torch.randn(b, q, cells, generator=g) * 2).requires_grad_(),
        "mask_basis": basis,
    }
    final, *aux = [mk() for _ in range(sets)]
    return {**final, "aux_outputs": aux, "cluster_scales": []}


def make_targets(counts, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        masks = torch.zeros(n, size, size, dtype=torch.bool)
        for j in range(n):
            y0, x0 = (int(v) for v in torch.randint(0, size // 2, (2,), generator=g))
            h, w = (int(v) for v in torch.randint(4, size // 2, (2,), generator=g))
            masks[j, y0 : y0 + h, x0 : x0 + w] = True
        out.append({"labels": torch.randint(0, K, (n,), generator=g), "masks": masks})
    return out


@contextlib.contextmanager
def recorded_matches():
    """The host indices the criterion assigns (per set, per image)."""
    seen = []
    real = criterion_module.assign

    def record(costs, counts):
        out = real(costs, counts)
        seen.append([[(s.tolist(), t.tolist()) for s, t in per_set] for per_set in out])
        return out

    criterion_module.assign = record
    try:
        yield seen
    finally:
        criterion_module.assign = real


def check_against_reference(crit, outputs, targets, leaves):
    with recorded_matches() as seen:
        got = crit(outputs, targets, generators=gens(len(targets)))
    want, want_matches = reference(crit, outputs, targets, gens(len(targets)))
    if any(len(t["labels"]) for t in targets):
        assert seen == [want_matches]  # the same assignment, set by set, image by image
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(
            got[key].float(), want[key].float().reshape(()), rtol=1e-5, atol=1e-6, msg=key
        )
    grads_got = torch.autograd.grad(sum(got.values()), leaves, allow_unused=True)
    total = sum(want.values())
    if total.grad_fn is None:  # nothing of the reference depends on the leaves
        assert all(g is None or not g.abs().any() for g in grads_got)
        return got
    grads_want = torch.autograd.grad(total, leaves, allow_unused=True)
    for g, w in zip(grads_got, grads_want, strict=True):
        if w is None:
            assert g is None or not g.abs().any()
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    return got


@pytest.mark.parametrize("stride", [32, 16, 8, 4])
def test_dense_sets_match_the_per_image_reference(stride, make_criterion):
    """Deep supervision (3 sets), different target counts, an image without targets, more
    targets than queries (image 2: 6 targets, 5 queries), masks at stride 32 / 2**L of a
    64 x 64 input: same matches, losses and gradients as the reference."""
    outputs = dense_outputs(b=4, q=5, size=64 // stride, sets=3)
    targets = make_targets([3, 0, 6, 1])
    sets = [outputs, *outputs["aux_outputs"]]
    leaves = [x for s in sets for x in (s["pred_logits"], s["pred_masks"])]
    check_against_reference(make_criterion(num_classes=K, num_points=48), outputs, targets, leaves)


@pytest.mark.parametrize("counts", [[2, 0, 4], [0, 0, 0]])
def test_factorised_nine_sets_match_the_per_image_reference(counts, make_criterion):
    """The tiny path (coefficients over a shared basis), 9 prediction sets as the paper's
    deep supervision, and a batch without any target."""
    outputs = factorised_outputs(b=3, q=6, cells=4, size=16, sets=9)
    targets = make_targets(counts)
    sets = [outputs, *outputs["aux_outputs"]]
    leaves = [outputs["mask_basis"], *(s["mask_coefficients"] for s in sets)]
    got = check_against_reference(
        make_criterion(num_classes=K, num_points=48), outputs, targets, leaves
    )
    assert len(got) == 27
    if not any(counts):
        assert all(float(got[k].detach()) == 0.0 for k in got if "mask" in k or "dice" in k)


def test_batching_over_sets_equals_one_set_at_a_time(make_criterion):
    """A target sampled at every set's points at once is exactly (bit for bit) each set's
    sample; the costs of S sets in one batch are those of each set alone to float rounding
    (a batched matrix product may sum in another order: not bit for bit)."""
    crit = make_criterion(num_classes=K, num_points=48)
    outputs = dense_outputs(b=3, q=5, size=16, sets=4)
    targets = make_targets([2, 0, 3])
    counts = [len(t["labels"]) for t in targets]
    coords = torch.rand(4, 3, crit.num_points, 2, generator=torch.Generator().manual_seed(3))
    stack = torch.cat([t["masks"] for t in targets]).float()[:, None]
    sets = [outputs, *outputs["aux_outputs"]]
    logits = torch.stack([s["pred_logits"].detach() for s in sets])
    masks = [s["pred_masks"].detach() for s in sets]
    labels = torch.nn.utils.rnn.pad_sequence([t["labels"] for t in targets], batch_first=True)
    points = sample_targets(stack, counts, coords)
    together = crit.matcher.batched_costs(logits, masks, labels, points, coords)
    for s in range(4):
        alone_points = sample_targets(stack, counts, coords[s : s + 1])
        assert torch.equal(points[s : s + 1], alone_points)
        alone = crit.matcher.batched_costs(
            logits[s : s + 1], masks[s : s + 1], labels, alone_points, coords[s : s + 1]
        )
        torch.testing.assert_close(together[s], alone[0], rtol=1e-6, atol=1e-6)


def test_summary_values_on_the_device_equal_summarize(make_criterion):
    outputs = dense_outputs(b=2, q=4, size=8, sets=3)
    losses = make_criterion(num_classes=K, num_points=48)(
        outputs, make_targets([2, 1]), generators=gens(2)
    )
    keys, values = summary_values(losses)
    assert values.dtype == torch.float64 and values.shape == (len(keys),)
    want = summarize(losses)
    assert set(keys) == set(want) == {"loss_ce", "loss_mask", "loss_dice", "loss"}
    for k, v in zip(keys, values.tolist(), strict=True):
        assert v == pytest.approx(want[k], rel=1e-12)


# --------------------------------------------------------------------------------------
# No host synchronisation in a training step.


@pytest.fixture
def tiny_config(tiny_ade20k):
    """``tiny_config(root, level=3)``: the engine tests' tiny HCFormer, 4 AMP iterations of 2."""
    from hcformer.config import build_config

    def make(root: Path, level: int = 3):
        solver = {"iterations": 4, "batch_size": 2, "clip_grad": 0.01, "amp": True}
        return build_config(tiny_ade20k(root, level, solver=solver, loss={"num_points": 32}))

    return make


def tiny_trainer(cfg, run_dir: Path):
    from hcformer.engine.train import Trainer

    trainer = Trainer(cfg, run_dir, seed=0, info={})
    trainer.setup()
    return trainer


# The eq. (5) backward's CPU path picks each image's live channels (a read of CPU tensors); on
# CUDA its kernels take the dense path, which reads nothing.
CPU_ONLY_READS = (os.path.join("hcformer", "ops", "fast.py"),)


@contextlib.contextmanager
def host_reads_forbidden():
    """Every way a tensor's values reach Python raises, but the criterion's one copy of the
    matching costs (:func:`hcformer.losses.matcher.costs_to_host`), which is counted."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    allowed = [0]
    copies = []

    def forbid(name):
        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if allowed[0] or caller.endswith(CPU_ONLY_READS):
                return saved[name](self, *args, **kwargs)
            raise AssertionError(f"host read inside the training step: Tensor.{name}")

        return method

    real = criterion_module.costs_to_host

    def one_copy(costs):
        copies.append(tuple(costs.shape))
        allowed[0] += 1
        try:
            return real(costs)
        finally:
            allowed[0] -= 1

    for n in names:
        setattr(torch.Tensor, n, forbid(n))
    criterion_module.costs_to_host = one_copy
    try:
        yield copies
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        criterion_module.costs_to_host = real


@pytest.mark.parametrize("level", [0, 3])
def test_a_cpu_training_step_reads_nothing_but_the_matching_costs(tmp_path, level, tiny_config):
    """The step reads no tensor value on the host (``.item()``, ``.cpu()``, ``.tolist()``,
    ``float()``, ``bool()``, ...) except the one copy of every set's cost matrices; the logged
    values come at the next read. L = 0: dense stride-32 masks; L = 3: coefficients over the
    decoded basis (the tiny path)."""
    trainer = tiny_trainer(tiny_config(tmp_path / "data", level), tmp_path / "run")
    batch = trainer.batches[0]
    with host_reads_forbidden() as copies:
        keys, values = trainer.step(batch)
    # One copy for the pass: [sets, images, queries, most targets of an image].
    assert len(copies) == 1 and copies[0][:3] == (3, 2, 6)
    reg = {"loss_reg"} if level else set()  # the regulariser of the clustering modules' s(i)
    assert set(keys) == {"loss_ce", "loss_mask", "loss_dice", "loss", "grad_norm", *reg}
    ((it, totals),) = trainer.read_stats()
    assert it == 1 and totals == dict(zip(keys, values.tolist(), strict=True))
    assert all(np.isfinite(v) for v in totals.values())


def test_a_non_finite_loss_is_caught_at_the_read_and_never_saved(
    tmp_path, monkeypatch, tiny_config
):
    from hcformer.errors import HCFormerError

    trainer = tiny_trainer(tiny_config(tmp_path / "data"), tmp_path / "run")
    trainer.step(trainer.batches[0])
    real = trainer.criterion.forward
    monkeypatch.setattr(
        trainer.criterion,
        "forward",
        lambda *a, **k: {**(out := real(*a, **k)), "loss_dice": out["loss_dice"] * float("nan")},
    )
    trainer.step(trainer.batches[1])
    assert trainer.save() is None  # weights past a NaN loss are not written
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(HCFormerError, match=r"iteration 2: the loss is not finite \(loss_dice"):
        trainer.read_stats()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_training_step_synchronises_only_for_the_matching(tmp_path, tiny_config):
    """torch.cuda's sync debug mode errors at any synchronising call but the one copy of the
    matching costs (allowed through ``costs_to_host``)."""
    trainer = tiny_trainer(tiny_config(tmp_path / "data"), tmp_path / "run")
    trainer.step(trainer.batches[0])  # warm-up: lazy initialisation may synchronise
    torch.cuda.synchronize()
    real = criterion_module.costs_to_host

    def allowed(costs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(costs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    criterion_module.costs_to_host = allowed
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(trainer.batches[1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
        criterion_module.costs_to_host = real
    assert len(trainer.read_stats()) == 2


def test_benchmark_splits_a_step_into_its_phases(tiny_config):
    """``hcformer benchmark-train``'s split: every phase timed (the criterion marks the end of
    its matching), the phases within the step's time, and one readable line naming them."""
    from hcformer.engine.benchmark import PHASES, readable, time_training

    cfg = tiny_config(Path("unused"))
    result = time_training(cfg, batch=2, iterations=2, warmup=0, device=torch.device("cpu"))
    phases = result["phase_seconds"]
    assert (
        tuple(phases) == PHASES == ("data", "forward", "matching", "loss", "backward", "optimiser")
    )
    assert all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) <= result["seconds_per_iteration_mean"] * 1.01
    line = readable({**result, "exp_id": "x"})
    assert line.startswith("hcformer benchmark-train: x on cpu") and all(p in line for p in PHASES)
