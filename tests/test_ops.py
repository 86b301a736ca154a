"""hcformer.ops: eq. (3) and eq. (5) against a dense all-pairs attention with a locality mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from hcformer import ops
from hcformer.ops import fast, reference

IMPLS = {"reference": reference, "fast": fast}
COARSE_SIZES = [(1, 1), (2, 2), (4, 6), (3, 5)]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dense_assignment(
    feat: torch.Tensor, coarse: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs attention [B, HW, hw] restricted to the parent's 3x3 neighbourhood.

    Also returns the 9-candidate index [HW, 9] of each coarse cell (-1 where outside the map),
    built from coordinates, independently of unfold.
    """
    b, c, h, w = feat.shape
    hc, wc = coarse.shape[2:]
    sim = torch.einsum("bcn,bcm->bnm", feat.flatten(2), coarse.flatten(2))  # [B, HW, hw]
    fy, fx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = torch.meshgrid(torch.arange(hc), torch.arange(wc), indexing="ij")
    dy = cy.flatten()[None, :] - (fy.flatten() // 2)[:, None]
    dx = cx.flatten()[None, :] - (fx.flatten() // 2)[:, None]
    local = (dy.abs() <= 1) & (dx.abs() <= 1)  # [HW, hw]
    logits = (sim / (1e-8 + abs(scale))).masked_fill(~local, float("-inf"))
    dense = logits.softmax(-1)
    index = torch.full((h * w, 9), -1, dtype=torch.long)
    for k in range(9):
        ky, kx = k // 3 - 1, k % 3 - 1
        py, px = fy.flatten() // 2 + ky, fx.flatten() // 2 + kx
        inside = (py >= 0) & (py < hc) & (px >= 0) & (px < wc)
        index[inside, k] = (py * wc + px)[inside]
    return dense, index


def _to_candidates(dense: torch.Tensor, index: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, HW, hw] dense attention -> [B, 9, H, W] in candidate order (0 outside the map)."""
    picked = dense.gather(2, index.clamp(min=0)[None].expand(dense.shape[0], -1, -1))
    picked = picked.masked_fill(index[None] < 0, 0.0)
    return picked.transpose(1, 2).reshape(dense.shape[0], 9, h, w)


def _features(b: int, c: int, hc: int, wc: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feat = F.normalize(torch.randn(b, c, 2 * hc, 2 * wc, generator=g, dtype=dtype), dim=1)
    coarse = F.normalize(torch.randn(b, c, hc, wc, generator=g, dtype=dtype), dim=1)
    return feat, coarse


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hc,wc", COARSE_SIZES)
def test_clustering_equals_dense_local_attention(impl, hc, wc):
    feat, coarse = _features(2, 5, hc, wc)
    scale = 0.07
    dense, index = _dense_assignment(feat, coarse, scale)
    expected = _to_candidates(dense, index, 2 * hc, 2 * wc)
    got = IMPLS[impl].clustering(feat, coarse, torch.tensor(scale, dtype=torch.float64))
    assert got.shape == (2, 9, 2 * hc, 2 * wc)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # candidates outside the map are exactly zero, rows sum to one
    outside = (index < 0).T.reshape(9, 2 * hc, 2 * wc)
    assert torch.all(got[:, outside] == 0)
    torch.testing.assert_close(got.sum(1), torch.ones(2, 2 * hc, 2 * wc, dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hc,wc", COARSE_SIZES)
def test_decode_equals_dense_attention_times_values(impl, hc, wc):
    feat, coarse = _features(3, 4, hc, wc, seed=1)
    dense, index = _dense_assignment(feat, coarse, 0.2)
    assignment = _to_candidates(dense, index, 2 * hc, 2 * wc)
    x = torch.randn(3, 6, hc, wc, dtype=torch.float64)
    expected = torch.einsum("bnm,bcm->bcn", dense, x.flatten(2)).reshape(3, 6, 2 * hc, 2 * wc)
    got = IMPLS[impl].decode(x, assignment)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_clustering(impl):
    feat, coarse = _features(2, 3, 2, 3, seed=2)
    feat.requires_grad_(True)
    coarse.requires_grad_(True)
    scale = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)  # |s| path, negative s
    assert torch.autograd.gradcheck(IMPLS[impl].clustering, (feat, coarse, scale))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_decode(impl):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    # any weights, not only a softmax: decode is linear in each argument
    a = torch.randn(2, 9, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(IMPLS[impl].decode, (x, a))


def test_fast_equals_reference_forward_and_backward_float32():
    torch.manual_seed(4)
    feat = F.normalize(torch.randn(2, 16, 12, 20), dim=1).requires_grad_(True)
    coarse = F.normalize(torch.randn(2, 16, 6, 10), dim=1).requires_grad_(True)
    scale = torch.tensor(0.1, requires_grad=True)
    x = torch.randn(2, 7, 6, 10, requires_grad=True)
    results = []
    for impl in (reference, fast):
        a = impl.clustering(feat, coarse, scale)
        out = impl.decode(x, a)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        grads = torch.autograd.grad(loss, (feat, coarse, scale, x))
        results.append((a, out, *grads))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_fast_decode_mixed_precision_inputs_promote():
    a = torch.softmax(torch.randn(1, 9, 4, 4), 1)
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    out = fast.decode(x, a)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.decode(x, a.double()))


@pytest.mark.parametrize("impl", IMPLS)
def test_clustering_rejects_bad_shapes(impl):
    s = torch.tensor(0.1)
    with pytest.raises(ValueError, match=r"even.*\(1, 4, 5, 6\)"):
        IMPLS[impl].clustering(torch.randn(1, 4, 5, 6), torch.randn(1, 4, 2, 3), s)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 3, 3\).*got \(1, 4, 3, 2\)"):
        IMPLS[impl].clustering(torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 2), s)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 3, 3\).*got \(1, 4, 3, 3\)"):
        IMPLS[impl].clustering(torch.randn(2, 4, 6, 6), torch.randn(1, 4, 3, 3), s)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 3, 3\).*got \(1, 5, 3, 3\)"):
        IMPLS[impl].clustering(torch.randn(1, 4, 6, 6), torch.randn(1, 5, 3, 3), s)
    with pytest.raises(ValueError, match="scale must be a scalar"):
        IMPLS[impl].clustering(torch.randn(1, 4, 6, 6), torch.randn(1, 4, 3, 3), torch.ones(2))
    with pytest.raises(ValueError, match=r"expected feat \[B, C, H, W\]"):
        IMPLS[impl].clustering(torch.randn(4, 6, 6), torch.randn(4, 3, 3), s)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_rejects_bad_shapes(impl):
    with pytest.raises(ValueError, match=r"even.*\(1, 9, 6, 7\)"):
        IMPLS[impl].decode(torch.randn(1, 2, 3, 3), torch.rand(1, 9, 6, 7))
    with pytest.raises(ValueError, match=r"9 candidates.*\(1, 4, 6, 6\)"):
        IMPLS[impl].decode(torch.randn(1, 2, 3, 3), torch.rand(1, 4, 6, 6))
    with pytest.raises(ValueError, match=r"\[1, C, 3, 3\].*got \(1, 2, 3, 4\)"):
        IMPLS[impl].decode(torch.randn(1, 2, 3, 4), torch.rand(1, 9, 6, 6))
    with pytest.raises(ValueError, match=r"\[2, C, 3, 3\].*got \(1, 2, 3, 3\)"):
        IMPLS[impl].decode(torch.randn(1, 2, 3, 3), torch.rand(2, 9, 6, 6))


def test_fast_path_runs_on_meta_device_with_backward():
    feat = torch.empty(2, 8, 6, 10, device="meta", requires_grad=True)
    coarse = torch.empty(2, 8, 3, 5, device="meta", requires_grad=True)
    scale = torch.empty((), device="meta", requires_grad=True)
    a = ops.clustering(feat, coarse, scale)
    out = ops.decode(coarse, a)
    assert a.device.type == "meta" and a.shape == (2, 9, 6, 10)
    assert out.shape == (2, 8, 6, 10)
    out.sum().backward()
    assert feat.grad.shape == feat.shape and coarse.grad.shape == coarse.shape
    assert scale.grad.shape == ()


def test_fast_path_runs_under_fake_tensor_mode_and_flop_counter():
    with FakeTensorMode(), FlopCounterMode(display=False):
        feat = torch.empty(1, 8, 6, 10)
        coarse = torch.empty(1, 8, 3, 5)
        a = ops.clustering(feat, coarse, torch.tensor(0.1))
        out = ops.decode(coarse, a)
        assert a.shape == (1, 9, 6, 10) and out.shape == (1, 8, 6, 10)


def test_mac_counts_match_flop_counter_on_reference():
    # The reference runs its contractions as bmm, which FlopCounterMode counts (2 flops per MAC).
    feat, coarse = _features(2, 8, 3, 5)
    scale = torch.tensor(0.1, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        a = reference.clustering(feat, coarse, scale)
    assert counter.get_total_flops() == 2 * ops.clustering_macs(2, 8, 6, 10)
    x = torch.randn(2, 11, 3, 5, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        reference.decode(x, a)
    assert counter.get_total_flops() == 2 * ops.decode_macs(2, 11, 6, 10)


def _one_hot(k: torch.Tensor) -> torch.Tensor:
    """[B, H, W] candidate indices -> [B, 9, H, W] one-hot assignment."""
    return F.one_hot(k, 9).permute(0, 3, 1, 2).double()


def test_hard_clusters_hand_made_hierarchy():
    # fine 4x8 -> coarse 2x4 -> coarsest 1x2 (k = 4 is the parent, 3/5 left/right, 0 up-left, 2 up-right)
    k1 = torch.full((1, 2, 4), 4)
    k1[0, 0, 1] = 5  # cell (0, 1) joins its right neighbour's cluster: coarsest cell 1
    k1[0, 1, 2] = 3  # cell (1, 2) joins its left neighbour's cluster: coarsest cell 0
    k0 = torch.full((1, 4, 8), 4)
    k0[0, 3, 5] = 2  # pixel (3, 5), parent (1, 2) -> coarse cell (0, 3) -> coarsest cell 1
    k0[0, 2, 3] = 2  # pixel (2, 3), parent (1, 1) -> coarse cell (0, 2) -> coarsest cell 1
    k0[0, 0, 2] = 3  # pixel (0, 2), parent (0, 1) -> coarse cell (0, 0) -> coarsest cell 0
    labels0, labels1 = ops.hard_clusters([_one_hot(k0), _one_hot(k1)])
    assert labels1.tolist() == [[[0, 1, 1, 1], [0, 0, 0, 1]]]
    assert labels0.tolist() == [
        [
            [0, 0, 0, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 0, 0, 1, 1],
            [0, 0, 0, 0, 0, 1, 1, 1],
        ]
    ]
    assert labels0.dtype == torch.long


def test_hard_parents_never_picks_a_candidate_outside_the_map():
    uniform = torch.full((1, 9, 4, 4), 1 / 9)  # all tied: argmax would pick k = 0 everywhere
    parents = ops.hard_parents(uniform)
    # the lowest inside candidate: pixel (0, 0) -> k = 4 (itself), pixel (2, 2) -> k = 0 (cell 0)
    assert parents[0, 0, 0] == 0 and parents[0, 2, 2] == 0 and parents[0, 0, 3] == 0
    assert parents.min() >= 0 and parents.max() < 4


def test_hard_clusters_rejects_inconsistent_levels():
    with pytest.raises(ValueError, match="half the resolution"):
        ops.hard_clusters([torch.rand(1, 9, 8, 8), torch.rand(1, 9, 2, 2)])
    assert ops.hard_clusters([]) == []


def test_flop_counter_counts_the_fast_path_exactly_forward_and_backward():
    feat, coarse = _features(2, 8, 3, 5)
    feat.requires_grad_(True)
    coarse.requires_grad_(True)
    x = torch.randn(2, 11, 3, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.1, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        out = ops.decode(x, ops.clustering(feat, coarse, scale))
    forward = counter.get_total_flops()
    assert forward == 2 * (ops.clustering_macs(2, 8, 6, 10) + ops.decode_macs(2, 11, 6, 10))
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    # each op's backward runs its two adjoints, each as costly as the forward
    assert counter.get_total_flops() == 2 * forward


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_fast_path_accepts_any_memory_layout(layout):
    feat, coarse = _features(2, 6, 3, 4, seed=5)
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    if layout == "channels_last":
        feat = feat.contiguous(memory_format=torch.channels_last)
        coarse = coarse.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:  # every other channel of a wider tensor
        feat = torch.cat([feat, feat], 1)[:, ::2]
        x = torch.cat([x, x], 1)[:, ::2]
    scale = torch.tensor(0.2, dtype=torch.float64)
    a = fast.clustering(feat, coarse, scale)
    torch.testing.assert_close(a, reference.clustering(feat, coarse, scale))
    torch.testing.assert_close(fast.decode(x, a), reference.decode(x, a))


def test_fast_path_gradients_when_only_some_inputs_require_grad():
    feat, coarse = _features(1, 4, 2, 3, seed=6)
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64)
    scale = torch.tensor(0.3, dtype=torch.float64)
    a = reference.clustering(feat, coarse, scale)

    def grads(impl):
        x_ = x.clone().requires_grad_(True)
        impl.decode(x_, a).pow(2).sum().backward()  # the assignment needs no gradient
        coarse_ = coarse.clone().requires_grad_(True)
        impl.clustering(feat, coarse_, scale)[:, 4].pow(2).sum().backward()  # nor feat
        return x_.grad, coarse_.grad

    got, expected = grads(fast), grads(reference)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_decode_backward_with_channel_sparse_gradient(layout, monkeypatch):
    """A mask loss on a few matched queries leaves most channels without gradient; the fast
    backward then works on each image's live channels only: gradients equal the reference's."""
    feat, coarse = _features(3, 4, 3, 5, seed=8)
    a = reference.clustering(feat, coarse, torch.tensor(0.4, dtype=torch.float64))
    x = torch.randn(3, 10, 3, 5, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.zeros(3, 10, 6, 10, dtype=torch.float64)
    upstream[0, [1, 7]] = torch.randn(2, 6, 10, dtype=torch.float64)  # image 0: 2 channels
    upstream[2, 4, 2:4, 5] = 1.5  # image 2: a few pixels of one channel; image 1: nothing
    calls = []
    sparse = fast._live_channels_backward
    monkeypatch.setattr(
        fast, "_live_channels_backward", lambda *args: calls.append(1) or sparse(*args)
    )

    def grads(impl):
        x_, a_ = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
        return torch.autograd.grad(impl.decode(x_, a_), [x_, a_], upstream)

    got, expected = grads(fast), grads(reference)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert calls == [1]  # the live-channel path ran (3 of 30 channels live)
    assert not got[0][1].any() and not got[1][1].any()


def test_fast_path_under_cpu_autocast():
    feat, coarse = _features(1, 16, 4, 6, dtype=torch.float32, seed=7)
    x = torch.randn(1, 8, 4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = fast.clustering(feat.bfloat16(), coarse.bfloat16(), torch.tensor(0.5))
        out = fast.decode(x.bfloat16(), a)  # bf16 values, float32 softmax: promoted
    expected_a = reference.clustering(feat, coarse, torch.tensor(0.5))
    torch.testing.assert_close(a.float(), expected_a, rtol=0, atol=2e-2)
    torch.testing.assert_close(out.float(), reference.decode(x, expected_a), rtol=0, atol=5e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_logits_do_not_overflow_at_tiny_scale(impl):
    feat, coarse = _features(1, 8, 2, 3, dtype=torch.float32, seed=8)
    scale = torch.tensor(1e-6)  # 1 / |s| = 1e6 > the float16 maximum 65504
    a = IMPLS[impl].clustering(feat.half(), coarse.half(), scale)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a.sum(1), torch.ones(1, 4, 6))
    # nearly one-hot on the winner of the cosines, where float16 rounding cannot flip it
    soft = reference.clustering(feat.double(), coarse.double(), torch.tensor(0.01))
    top2 = soft.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 0.5
    assert clear.sum() >= 12
    assert torch.equal(a.argmax(1)[clear], soft.argmax(1)[clear])
    assert a.max(1).values[clear].min() > 0.99


def test_use_backend_validates_and_restores():
    with (
        pytest.raises(ValueError, match=r"use_backend: expected one of .*got 'cuda'"),
        fast.use_backend("cuda"),
    ):
        pass
    with fast.use_backend("torch"):
        assert fast._backend == "torch"
    assert fast._backend == "auto"


def test_cpu_tensors_take_the_batched_products_by_default(monkeypatch):
    def no_kernels():
        raise AssertionError("the Triton kernels were asked for on CPU tensors")

    monkeypatch.setattr(fast, "_triton_kernels", no_kernels)
    feat, coarse = _features(1, 3, 2, 3, seed=9)
    x = torch.randn(1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    coarse.requires_grad_(True)
    out = ops.decode(x, ops.clustering(feat, coarse, torch.tensor(0.2, dtype=torch.float64)))
    out.sum().backward()
    assert coarse.grad is not None and x.grad is not None


def test_ops_import_and_run_without_triton():
    import os
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from hcformer import ops\n"
        "from hcformer.ops import fast\n"
        "a = ops.clustering(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2), torch.tensor(0.1))\n"
        "print(tuple(ops.decode(torch.randn(1, 3, 2, 2), a).shape))\n"
        "try:\n"
        "    with fast.use_backend('triton'):\n"
        "        pass\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
        "print(fast._backend)\n"
    )
    env = {**os.environ, "HCFORMER_OPS_BACKEND": "torch"}  # the process-wide default
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "(1, 3, 4, 4)",
        "use_backend('triton'): triton is not installed",
        "torch",
    ]


def test_fused_assignment_op_equals_reference_with_every_gradient():
    # hcformer::local_assignment (eq. 3 whole; the Triton backend's path) computed by torch here
    feat, coarse = _features(2, 3, 3, 5, seed=10)
    scale = torch.tensor(-0.3, dtype=torch.float64)
    upstream = torch.randn(2, 9, 6, 10, dtype=torch.float64)
    got_leaves = [t.clone().requires_grad_(True) for t in (feat, coarse, scale)]
    got = fast.local_assignment(*got_leaves)
    ref_leaves = [t.clone().requires_grad_(True) for t in (feat, coarse, scale)]
    expected = reference.clustering(*ref_leaves)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(
        ("feat", "coarse", "scale"),
        torch.autograd.grad(got, got_leaves, upstream),
        torch.autograd.grad(expected, ref_leaves, upstream),
    ):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    leaves = [t.detach().requires_grad_(True) for t in (feat[:1, :, :4, :4], coarse[:1, :, :2, :2])]
    scale_ = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast.local_assignment, (*leaves, scale_))


def test_fused_assignment_op_flops_fake_and_meta():
    feat, coarse = _features(2, 8, 3, 5, seed=11)
    feat.requires_grad_(True)
    coarse.requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        a = fast.local_assignment(feat, coarse, torch.tensor(0.1, dtype=torch.float64))
    assert counter.get_total_flops() == 2 * ops.clustering_macs(2, 8, 6, 10)
    with FlopCounterMode(display=False) as counter:
        a.sum().backward()
    assert counter.get_total_flops() == 4 * ops.clustering_macs(2, 8, 6, 10)  # d feat, d coarse
    with FakeTensorMode():
        a = fast.local_assignment(
            torch.empty(1, 8, 6, 10, dtype=torch.float16),
            torch.empty(1, 8, 3, 5, dtype=torch.float16),
            torch.tensor(0.1),
        )
        assert a.shape == (1, 9, 6, 10) and a.dtype == torch.float32  # as masked_logits promotes
    leaves = [
        torch.empty(s, device="meta", requires_grad=True) for s in ((1, 4, 6, 10), (1, 4, 3, 5))
    ]
    scale = torch.empty((), device="meta", requires_grad=True)
    fast.local_assignment(*leaves, scale).sum().backward()
    assert leaves[0].grad.shape == (1, 4, 6, 10) and scale.grad.shape == ()


def test_cpu_clustering_keeps_the_similarity_and_torch_softmax():
    # the fused op is the Triton backend's; the CPU fast path runs the same ops as before it
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen: list[str] = []
    feat, coarse = _features(1, 3, 2, 3, seed=12)
    with Ops():
        ops.clustering(feat, coarse, torch.tensor(0.2, dtype=torch.float64))
    assert "hcformer.local_similarity.default" in seen and "aten._softmax.default" in seen
    assert not any("local_assignment" in op for op in seen)
