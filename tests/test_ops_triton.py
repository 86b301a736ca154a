"""hcformer.ops.triton_kernels: the fused kernels of eq. (3) and eq. (5) against the listings.

Triton's interpreter runs the kernels on CPU tensors only if ``TRITON_INTERPRET=1`` is in the
environment when triton is first imported, and it must not leak into other test modules (it would
turn every Triton kernel of the session, torch.compile's included, into NumPy). So without a GPU
this module runs itself in a subprocess with the variable set (``test_kernels_in_interpreter``);
in that subprocess, or in a session started with ``TRITON_INTERPRET=1``, its tests run on CPU
tensors. On a machine with CUDA they also run in the session itself on the GPU (compiled kernels).
Shapes are small: the interpreter executes every program of the grid in NumPy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hcformer import ops
from hcformer.ops import fast, reference

triton = pytest.importorskip("triton", reason="triton is not installed (the GPU extra)")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
runs_here = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="no CUDA device: these tests run on CPU in test_kernels_in_interpreter's subprocess",
)


@pytest.mark.skipif(INTERPRETED, reason="already inside the interpreter")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tests run compiled, here")
def test_kernels_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed[1]) >= len(CASES) + 8, done.stdout[-2000:]  # nothing skipped


@pytest.fixture
def kernel_calls(monkeypatch):
    """Force the Triton backend and record which kernels ran (so a silent fallback fails)."""
    from hcformer.ops import triton_kernels

    calls: list[str] = []
    for name in ("similarity", "gather", "scatter", "assignment", "assignment_backward"):
        original = getattr(triton_kernels, name)

        def wrapped(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(triton_kernels, name, wrapped)
    with fast.use_backend("triton"):
        yield calls


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel launch as (kernel name, its constexpr flags), in order."""
    from hcformer.ops import triton_kernels

    calls: list[tuple[str, dict]] = []
    original = triton_kernels._launch

    def wrapped(kernel, grid, device, *args, **meta):
        flags = {k: v for k, v in meta.items() if k.startswith("NEED_") or k == "SOFTMAX"}
        calls.append((kernel.fn.__name__, flags))
        return original(kernel, grid, device, *args, **meta)

    monkeypatch.setattr(triton_kernels, "_launch", wrapped)
    with fast.use_backend("triton"):
        yield calls


def _features(b, c, hc, wc, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    feat = F.normalize(torch.randn(b, c, 2 * hc, 2 * wc, generator=g, dtype=dtype), dim=1)
    coarse = F.normalize(torch.randn(b, c, hc, wc, generator=g, dtype=dtype), dim=1)
    x = torch.randn(b, 2 * c + 1, hc, wc, generator=g, dtype=dtype)
    upstream = torch.randn(b, 2 * c + 1, 2 * hc, 2 * wc, generator=g, dtype=dtype)
    return feat, coarse, x, upstream


def _forward_backward(impl, feat, coarse, scale, x, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in (feat, coarse, scale, x)]
    assignment = impl.clustering(*leaves[:3])
    decoded = impl.decode(leaves[3], assignment)
    grads = torch.autograd.grad(decoded, leaves, upstream)
    return assignment.detach(), decoded.detach(), grads


def _assert_fused_gradients(grads, kernel_calls, feat, coarse, scale, x, upstream):
    """The fused kernels ran (eq. 3 and eq. 5 forward, then each backward once) and the float64
    gradients equal the listings'."""
    assert kernel_calls == ["assignment", "gather", "scatter", "similarity"] + [
        "assignment_backward",
        "scatter",
    ]
    with fast.use_backend("torch"):
        expected = _forward_backward(reference, feat, coarse, scale, x, upstream)
    for g, e in zip(grads, expected[2]):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


CASES = {  # (dtype, batch, C_F, coarse h, coarse w, layout); x has 2 C_F + 1 channels
    "f64-odd-3x5": (torch.float64, 2, 3, 3, 5, "contiguous"),
    "f64-c1-1x1-border": (torch.float64, 2, 1, 1, 1, "contiguous"),
    "f32-c130-5x7": (torch.float32, 2, 130, 5, 7, "contiguous"),
    "f32-channels-last-2x3": (torch.float32, 1, 3, 2, 3, "channels_last"),
    "f64-strided-3x2": (torch.float64, 2, 3, 3, 2, "strided"),
}


@runs_here
@pytest.mark.parametrize("case", CASES)
def test_forward_and_every_gradient_equal_reference(case, kernel_calls):
    dtype, b, c, hc, wc, layout = CASES[case]
    feat, coarse, x, upstream = (t.to(DEVICE) for t in _features(b, c, hc, wc, dtype, seed=1))
    if layout == "channels_last":
        feat, coarse, x = (
            t.contiguous(memory_format=torch.channels_last) for t in (feat, coarse, x)
        )
    elif layout == "strided":  # every other channel of a wider tensor, and a transposed upstream
        feat = torch.cat([feat, feat], 1)[:, ::2]
        x = torch.cat([x, -x], 1)[:, ::2]
        upstream = upstream.transpose(2, 3).contiguous().transpose(2, 3)
    scale = torch.tensor(-0.3, dtype=dtype, device=DEVICE)  # the |s| of the logits
    got = _forward_backward(fast, feat, coarse, scale, x, upstream)
    # eq. (3) fused forward and backward; eq. (5): gather, and scatter + similarity backward
    assert sorted(set(kernel_calls)) == [
        "assignment",
        "assignment_backward",
        "gather",
        "scatter",
        "similarity",
    ]
    with fast.use_backend("torch"):
        expected = _forward_backward(reference, feat, coarse, scale, x, upstream)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    assignment, decoded, grads = got
    torch.testing.assert_close(assignment, expected[0], **tol)
    torch.testing.assert_close(decoded, expected[1], **tol)
    for name, g, e in zip(("feat", "coarse", "scale", "x"), grads, expected[2]):
        # d s is one float32 sum over every pixel and candidate: the two sides add its terms in
        # different orders (on a GPU, relative differences near 2e-6 were seen at C_F 130).
        scalar = {"rtol": 1e-5, "atol": 1e-5} if name == "scale" and not tol else tol
        torch.testing.assert_close(g, e, **scalar, msg=lambda m, n=name: f"d {n}: {m}")
    # candidates in the zero padding get exactly zero weight; each pixel's weights sum to one
    outside = reference.outside_mask(hc, wc, device=DEVICE)
    assert torch.all(assignment[:, outside] == 0)
    torch.testing.assert_close(assignment.sum(1), torch.ones_like(assignment[:, 0]))
    # outputs and gradients keep their input's memory format, as the batched-product path does
    if layout == "channels_last":
        assert decoded.is_contiguous(memory_format=torch.channels_last)
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads[:2])


@runs_here
def test_gradcheck_float64(kernel_calls):
    feat, coarse, x, _ = (
        t.to(DEVICE).requires_grad_(True) for t in _features(2, 2, 2, 3, torch.float64, seed=2)
    )
    scale = torch.tensor(0.4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(ops.clustering, (feat, coarse, scale), fast_mode=True)
    assert set(kernel_calls) == {"assignment", "assignment_backward", "scatter"}
    # decode is linear in each argument: any weights, not only a softmax
    a = torch.randn(2, 9, 4, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(ops.decode, (x, a), fast_mode=True)
    assert set(kernel_calls) == {
        "assignment",
        "assignment_backward",
        "similarity",
        "gather",
        "scatter",
    }


@runs_here
def test_only_needed_gradients_are_computed(kernel_calls):
    feat, coarse, x, upstream = (t.to(DEVICE) for t in _features(1, 3, 2, 3, torch.float64, 3))
    scale = torch.tensor(0.3, dtype=torch.float64, device=DEVICE)
    with fast.use_backend("torch"):
        a = reference.clustering(feat, coarse, scale)
    coarse_ = coarse.clone().requires_grad_(True)  # not feat: d feat = gather is skipped
    (d_coarse,) = torch.autograd.grad(ops.clustering(feat, coarse_, scale)[:, 4].sum(), coarse_)
    assert kernel_calls == ["assignment", "assignment_backward", "scatter"]
    kernel_calls.clear()
    x_ = x.clone().requires_grad_(True)  # not the assignment: d weights = similarity is skipped
    (d_x,) = torch.autograd.grad(ops.decode(x_, a), x_, upstream)
    assert kernel_calls == ["gather", "scatter"]
    with fast.use_backend("torch"):
        coarse_ = coarse.clone().requires_grad_(True)
        expected = torch.autograd.grad(
            reference.clustering(feat, coarse_, scale)[:, 4].sum(), coarse_
        )
        x_ = x.clone().requires_grad_(True)
        expected += torch.autograd.grad(reference.decode(x_, a), x_, upstream)
    torch.testing.assert_close(d_coarse, expected[0])
    torch.testing.assert_close(d_x, expected[1])


@runs_here
def test_half_precision_accumulates_in_float32(kernel_calls):
    feat, coarse, x, _ = (t.to(DEVICE) for t in _features(1, 64, 2, 3, torch.float32, seed=4))
    scale = torch.tensor(0.5, device=DEVICE)
    a = ops.clustering(feat.half(), coarse.half(), scale)
    out = ops.decode(x.half(), a)  # float16 values, float32 assignment: promoted to float32
    with fast.use_backend("torch"):
        expected_a = reference.clustering(feat, coarse, scale)
        expected_out = reference.decode(x, expected_a)
    assert a.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(a, expected_a, rtol=0, atol=5e-3)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=2e-2)
    sim = fast.local_similarity(feat.half(), coarse.half())  # 64 channels: float32 accumulation
    with fast.use_backend("torch"):
        expected_sim = fast.local_similarity(feat, coarse)
    assert sim.dtype == torch.float16
    torch.testing.assert_close(sim.float(), expected_sim, rtol=0, atol=2e-3)


@runs_here
def test_eager_calls_skip_the_custom_op_dispatch_that_counters_still_see(kernel_calls):
    from torch.utils.flop_counter import FlopCounterMode

    feat, coarse, x, upstream = (t.to(DEVICE) for t in _features(1, 4, 3, 2, torch.float64, 4))
    scale = torch.tensor(0.2, dtype=torch.float64, device=DEVICE)
    leaves = [t.detach().clone().requires_grad_(True) for t in (feat, coarse, scale, x)]
    assignment = ops.clustering(*leaves[:3])
    decoded = ops.decode(leaves[3], assignment)
    # eager: plain autograd Functions over the kernels, not the custom ops' dispatch
    assert type(assignment.grad_fn).__name__ == "_EagerAssignmentBackward"
    assert type(decoded.grad_fn).__name__ == "_EagerDecodeBackward"
    grads = torch.autograd.grad(decoded, leaves, upstream)
    _assert_fused_gradients(grads, kernel_calls, feat, coarse, scale, x, upstream)
    # under a dispatch mode (FLOP counting) the custom ops run, so their formulas count
    with FlopCounterMode(display=False) as counter:
        counted = ops.decode(x, ops.clustering(feat, coarse, scale))
    torch.testing.assert_close(counted, decoded.detach(), rtol=1e-12, atol=1e-12)
    b, c, h, w = feat.shape
    macs = fast.clustering_macs(b, c, h, w) + fast.decode_macs(b, x.shape[1], h, w)
    assert counter.get_total_flops() == 2 * macs


@runs_here
def test_torch_compile_sees_one_op_per_primitive(kernel_calls):
    feat, coarse, x, _ = (t.to(DEVICE) for t in _features(1, 3, 2, 3, torch.float32, seed=5))
    scale = torch.tensor(0.2, device=DEVICE)

    def step(feat, coarse, scale, x):
        return ops.decode(x, ops.clustering(feat, coarse, scale))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # a graph break raises
    torch.testing.assert_close(compiled(feat, coarse, scale, x), step(feat, coarse, scale, x))
    assert kernel_calls == ["assignment", "gather"] * 2  # compiled, then eager


@runs_here
def test_compiled_backward_is_the_fused_one(kernel_calls):
    feat, coarse, x, upstream = (t.to(DEVICE) for t in _features(2, 3, 2, 3, torch.float64, 7))
    scale = torch.tensor(0.2, dtype=torch.float64, device=DEVICE)

    def step(feat, coarse, scale, x):
        return ops.decode(x, ops.clustering(feat, coarse, scale))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (feat, coarse, scale, x)]
    grads = torch.autograd.grad(compiled(*leaves), leaves, upstream)
    _assert_fused_gradients(grads, kernel_calls, feat, coarse, scale, x, upstream)


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eq3_forward_is_one_kernel_launch_and_backward_two(dtype, launches):
    feat, coarse, _, _ = (t.to(DEVICE) for t in _features(2, 5, 3, 4, dtype, seed=8))
    feat, coarse = feat.requires_grad_(True), coarse.requires_grad_(True)
    scale = torch.tensor(0.25, dtype=dtype, device=DEVICE, requires_grad=True)
    with _DispatchedOps() as dispatched:
        a = ops.clustering(feat, coarse, scale)
    # one computing op reaches the dispatcher (no mask built, no division, no softmax; the dtype
    # promotion and the detach of the saved output run no kernel) and it is ONE kernel launch
    assert dispatched.ops == [
        "aten.promote_types.default",
        "hcformer.local_assignment.default",
        "aten.detach.default",
    ]
    assert launches == [("_logits_kernel", {"SOFTMAX": True})]
    launches.clear()
    upstream = torch.randn(a.shape, dtype=dtype, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad(a, (feat, coarse, scale), upstream.to(DEVICE))
    # softmax backward + scale + d feat in one kernel, d coarse by scatter (+ one sum for d s)
    assert launches == [
        ("_assignment_backward_kernel", {"NEED_FINE": True, "NEED_LOGITS": True}),
        ("_scatter_kernel", {}),
    ]
    leaves = [t.detach().requires_grad_(True) for t in (feat, coarse, scale)]
    with fast.use_backend("torch"):
        expected = torch.autograd.grad(reference.clustering(*leaves), leaves, upstream.to(DEVICE))
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    for name, g, e in zip(("feat", "coarse", "scale"), grads, expected):
        torch.testing.assert_close(g, e, **tol, msg=lambda m, n=name: f"d {n}: {m}")
    launches.clear()
    a = ops.clustering(feat.detach(), coarse.detach(), scale)
    (d_scale,) = torch.autograd.grad(a, scale, upstream.to(DEVICE))
    assert launches[1:] == [  # only d s: no dS stored, no d feat, no scatter
        ("_assignment_backward_kernel", {"NEED_FINE": False, "NEED_LOGITS": False})
    ]
    torch.testing.assert_close(d_scale, expected[2], **tol)


class _DispatchedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that reach the dispatcher at the top level (not those inside a custom op)."""

    def __enter__(self):
        self.ops: list[str] = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(INTERPRETED, reason="needs a process where triton runs compiled")
def test_cpu_tensors_without_interpreter_raise():
    feat, coarse, _, _ = _features(1, 2, 2, 2, torch.float32, seed=6)
    with fast.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.clustering(feat, coarse, torch.tensor(0.1))
