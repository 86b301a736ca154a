"""Fast eq. (3) and eq. (5): batched small matrix products on overlapping views, no 9x copy.

Both equations reduce to three local primitives between a fine map [B, C, H, W] and a coarse map
[B, C, h, w] (H = 2h, W = 2w), candidate k = (dy, dx) of fine pixel (Y, X) being the coarse cell
(Y//2 + dy - 1, X//2 + dx - 1), zero outside the map:

- ``_similarity``  S[k, Y, X]   = <f[:, Y, X], c[:, cand_k(Y, X)]>     (eq. 3 before the softmax)
- ``_gather``      out[:, Y, X] = sum_k a[k, Y, X] c[:, cand_k(Y, X)]  (eq. 5)
- ``_scatter``     the adjoint of ``_gather`` in c.

The gradients are the same primitives (d f of S = gather(c, dS); d c of S = scatter(f, dS);
d a of gather = similarity(g, c); d c of gather = scatter(g, a)), so the backward recomputes from
the inputs instead of saving the 9x neighbour tensor that the listing's unfold builds.

The "virtual grid": the zero-padded coarse map is stored channels-last and flattened, rows of
w + 2 cells; the fine map is stored as [cells, 4 children, C] on the same grid (the two extra cells
per row and two extra rows per image are zero and their results are dropped). Then the three
candidates (dy, 0..2) of every cell m sit at (m + dy * (w + 2) + dx) * C: ONE ``as_strided`` view
[cells, 3, C] with batch stride C (overlapping, never copied), and similarity and gather are three
batched products each ([4, C] x [C, 3] and [4, 3] x [3, C] per cell) over all cells and images at
once; scatter reads its 12 contributors per row of candidates the same way (``_scatter``). The
only copies are the layout changes of inputs and outputs (cheap when the input is channels-last,
as ``ClusteringModule``'s embeddings are). Outputs follow their input's memory format, as
convolutions do: ``decode`` of a channels-last x is channels-last, of a contiguous x contiguous.

The primitives are custom operators (``torch.ops.hcformer.local_similarity``, ``local_decode``
and their backwards) with fake kernels, so they run on any device, on ``meta`` and under
``FakeTensorMode``, are opaque to torch.compile, and FlopCounterMode counts them with the
formulas registered at the end of this file: exactly 9 * C * H * W multiply-adds per image for
clustering and for decode (``clustering_macs`` / ``decode_macs``), as fvcore counted the
listings' einsums, and twice that for each backward.

Backends. On CUDA tensors, where triton is installed, each primitive runs instead as one fused
Triton kernel (``hcformer.ops.triton_kernels``); the batched products above stay the path on the
CPU. ``use_backend("torch" | "triton" | "auto")`` (a context manager) forces one for a block: the
benchmark compares both on a GPU, and the tests force ``"triton"`` on CPU tensors, which then run
in Triton's interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported:
``tests/test_ops_triton.py`` runs itself in such a subprocess). The environment variable
``HCFORMER_OPS_BACKEND`` (same names) sets the default outside any ``use_backend`` block. The custom ops, fake kernels and
FLOP formulas are the same whichever backend runs. In plain eager mode on the Triton backend
``clustering`` and ``decode`` call the kernels through small ``autograd.Function``s instead
(``_eager_kernels``): the custom ops' Python dispatch costs more host time than their kernels
take; under ``torch.compile``, a dispatch mode (``FlopCounterMode``, fake tensors) or a tensor
subclass the custom ops run, so compilers and counters see them as before.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch.utils.flop_counter import register_flop_formula

from hcformer.ops._checks import check_clustering_args, check_decode_args
from hcformer.ops.reference import EPS, assignment_dtype, masked_logits

BACKENDS = ("auto", "torch", "triton")
# The process-wide default; HCFORMER_OPS_BACKEND=torch turns the Triton kernels off on a GPU.
_backend = os.environ.get("HCFORMER_OPS_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"HCFORMER_OPS_BACKEND: expected one of {BACKENDS}, got {_backend!r}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the primitives with backend ``name`` inside the block.

    "auto": Triton kernels for CUDA tensors where triton is installed, batched products otherwise;
    "torch": always the batched products; "triton": always the Triton kernels (CPU tensors run in
    Triton's interpreter and need ``TRITON_INTERPRET=1`` set before triton is imported).
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"use_backend: expected one of {BACKENDS}, got {name!r}")
    if name == "triton" and _triton_kernels() is None:
        raise RuntimeError("use_backend('triton'): triton is not installed")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """``hcformer.ops.triton_kernels``, imported on first use; None where triton is missing."""
    try:
        from hcformer.ops import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _kernels_for(t: torch.Tensor) -> ModuleType | None:
    """The Triton kernels module if the backend in force runs tensor ``t`` on it, else None."""
    if _backend == "torch" or (_backend == "auto" and t.device.type != "cuda"):
        return None
    return _triton_kernels()


def _fused_assignment(t: torch.Tensor) -> bool:
    """Whether ``clustering`` of features ``t`` runs as the fused ``local_assignment``: on the
    Triton backend. (Decided outside the custom op, so the torch backend keeps its ops.)"""
    if _backend == "torch" or (_backend == "auto" and t.device.type != "cuda"):
        return False
    return _triton_available()


@torch.compiler.assume_constant_result
def _triton_available() -> bool:
    return _triton_kernels() is not None


@dataclass(frozen=True)
class _Grid:
    """Geometry of the virtual grid for coarse maps h x w of a batch of b images."""

    b: int
    h: int
    w: int

    @property
    def cols(self) -> int:  # w + 2: the zero-padded row, left and right
        return self.w + 2

    @property
    def rows(self) -> int:  # h + 2: the zero-padded column, top and bottom
        return self.h + 2

    @property
    def lead(self) -> int:  # zero cells before a fine grid: the reach of the 3x3 neighbourhood
        return 2 * self.cols + 2

    @property
    def cells(self) -> int:
        return self.b * self.rows * self.cols

    def storage(self, channels: int) -> int:
        """Elements of a padded coarse map: the last cell's (2, 2) candidate ends 2 cols + 3 cells
        past the grid (cells off the map read the next image's cells or this tail: dropped)."""
        return (self.cells + 2 * self.cols + 3) * channels


def _no_autocast(t: torch.Tensor):
    # The primitives run in the dtype of their (already promoted) inputs: bmm under autocast
    # would switch dtype between the calls that accumulate into one buffer.
    kind = t.device.type
    if kind in ("cpu", "cuda", "xpu") and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _coarse_to_grid(coarse: torch.Tensor, g: _Grid) -> torch.Tensor:
    """Flat padded channels-last storage of coarse [B, C, h, w] on the virtual grid."""
    c = coarse.shape[1]
    flat = coarse.new_zeros(g.storage(c))
    grid = flat[: g.cells * c].view(g.b, g.rows, g.cols, c)
    grid[:, 1 : g.h + 1, 1 : g.w + 1].copy_(coarse.permute(0, 2, 3, 1))
    return flat


def _candidates(flat: torch.Tensor, g: _Grid, channels: int, dy: int) -> torch.Tensor:
    """[cells, 3, C] view: for each cell, its candidates (dy, 0..2) in the padded coarse map."""
    return flat.as_strided((g.cells, 3, channels), (channels, channels, 1), dy * g.cols * channels)


def _fine_to_grid(t: torch.Tensor, g: _Grid) -> torch.Tensor:
    """[B, K, H, W] -> flat storage of [lead + cells, 4, K]: the children p = 2 i + j of each cell.

    The ``g.lead`` cells before the grid, the spare cells and rows are zero (``_scatter`` reads
    them); ``_cells`` gives the [cells, 4, K] view of the grid itself.
    """
    k = t.shape[1]
    flat = t.new_empty((g.lead + g.cells) * 4 * k)
    flat[: g.lead * 4 * k].zero_()
    grid = _cells(flat, g, k).view(g.b, g.rows, g.cols, 4, k)
    grid[:, g.h :].zero_()
    grid[:, : g.h, g.w :].zero_()
    grid[:, : g.h, : g.w].unflatten(3, (2, 2)).copy_(
        t.view(g.b, k, g.h, 2, g.w, 2).permute(0, 2, 4, 3, 5, 1)
    )
    return flat


def _cells(flat: torch.Tensor, g: _Grid, k: int) -> torch.Tensor:
    """[cells, 4, K] view of a ``_fine_to_grid`` storage."""
    return flat[g.lead * 4 * k :].view(g.cells, 4, k)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether t is stored channels-last (then results derived from it are too, as conv does)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _to_nchw(nhwc: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """[B, H, W, K] (any strides) -> a new [B, K, H, W] in the requested memory format."""
    if channels_last:
        return nhwc.contiguous().permute(0, 3, 1, 2)
    return nhwc.permute(0, 3, 1, 2).contiguous()


def _empty_nchw(like: torch.Tensor, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    """What ``_to_nchw`` returns, without data (for the fake/meta kernels)."""
    b, k, h, w = shape
    if channels_last:
        return like.new_empty((b, h, w, k)).permute(0, 3, 1, 2)
    return like.new_empty((b, k, h, w))


def _fine_from_grid(t: torch.Tensor, g: _Grid, channels_last: bool) -> torch.Tensor:
    """Inverse of ``_fine_to_grid``: [cells, 4, K] -> a new [B, K, H, W]."""
    k = t.shape[-1]
    view = t.view(g.b, g.rows, g.cols, 2, 2, k)[:, : g.h, : g.w]  # b, h, w, i, j, K
    if channels_last:
        out = view.permute(0, 1, 3, 2, 4, 5).reshape(g.b, 2 * g.h, 2 * g.w, k)
        return out.permute(0, 3, 1, 2)
    return view.permute(0, 5, 1, 3, 2, 4).reshape(g.b, k, 2 * g.h, 2 * g.w)


def _similarity(fine: torch.Tensor, flat: torch.Tensor, g: _Grid, c: int) -> torch.Tensor:
    """S [B, 9, H, W]: dot product of each fine pixel (grid storage) with its 9 candidate cells."""
    fg = _cells(fine, g, c)
    sim = fg.new_empty((3, g.cells, 4, 3))  # dy, cell, child, dx
    for dy in range(3):
        torch.bmm(fg, _candidates(flat, g, c, dy).transpose(1, 2), out=sim[dy])
    sim = sim.view(3, g.b, g.rows, g.cols, 2, 2, 3)[:, :, : g.h, : g.w]  # dy b h w i j dx
    return sim.permute(1, 0, 6, 2, 4, 3, 5).reshape(g.b, 9, 2 * g.h, 2 * g.w)


def _gather(
    flat: torch.Tensor, weights: torch.Tensor, g: _Grid, c: int, channels_last: bool
) -> torch.Tensor:
    """out [B, C, H, W] = sum_k weights[:, k] * (candidate k of the coarse map): eq. (5)."""
    wg = _cells(weights, g, 9).view(g.cells, 4, 3, 3)  # cell, child, dy, dx
    out = flat.new_empty((g.cells, 4, c))
    for dy in range(3):
        cand = _candidates(flat, g, c, dy)
        if dy == 0:
            torch.bmm(wg[:, :, dy], cand, out=out)
        else:
            out.baddbmm_(wg[:, :, dy], cand)
    return _fine_from_grid(out, g, channels_last)


def _scatter(
    fine: torch.Tensor, weights: torch.Tensor, g: _Grid, c: int, channels_last: bool
) -> torch.Tensor:
    """Adjoint of ``_gather`` in the coarse map: a new [B, C, h, w].

    Padded coarse cell q receives weight (dy, dx) of each child of the cells m = q - dy * cols - dx.
    For a fixed dy those three cells are consecutive on the fine grid, so their 3 x 4 children
    are ONE [12, C] matrix per q (an overlapping view again): three batched [1, 12] x [12, C]
    products, with the 12 weights of each q gathered first.
    """
    # w12[2 - dy, q, t, p] = weight (dy, dx = 2 - t) of child p of cell m = q - dy * cols - 2 + t:
    # in the [lead + cells, 4, 3, 3] weights storage that is offset 36 (q + lead - dy cols - 2 + t)
    # + 9 p + 3 dy + 2 - t, linear in (2 - dy, q, t, p): one strided view, copied once.
    strides = (36 * g.cols - 3, 36, 35, 9)
    first = 36 * (g.lead - 2 * g.cols - 2) + 3 * 2 + 2  # dy = 2, q = 0, t = 0, p = 0
    w12 = weights.as_strided((3, g.cells, 3, 4), strides, first).contiguous()
    out = fine.new_empty((g.cells, 1, c))
    for dy in range(3):
        offset = (g.lead - dy * g.cols - 2) * 4 * c
        children = fine.as_strided((g.cells, 12, c), (4 * c, c, 1), offset)
        if dy == 0:
            torch.bmm(w12[2 - dy].view(g.cells, 1, 12), children, out=out)
        else:
            out.baddbmm_(w12[2 - dy].view(g.cells, 1, 12), children)
    grid = out.view(g.b, g.rows, g.cols, c)
    return _to_nchw(grid[:, 1 : g.h + 1, 1 : g.w + 1], channels_last)


def _fine_grid_of(fine: torch.Tensor) -> _Grid:
    return _Grid(fine.shape[0], fine.shape[2] // 2, fine.shape[3] // 2)


@torch.library.custom_op("hcformer::local_similarity", mutates_args=())
def local_similarity(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """S [B, 9, H, W] = <fine[:, Y, X], coarse[:, candidate k of (Y, X)]> (eq. 3 before softmax)."""
    kernels = _kernels_for(fine)
    if kernels is not None:
        return kernels.similarity(fine, coarse)
    g, c = _fine_grid_of(fine), fine.shape[1]
    with _no_autocast(fine):
        return _similarity(_fine_to_grid(fine, g), _coarse_to_grid(coarse, g), g, c)


@local_similarity.register_fake
def _(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    b, _, h, w = fine.shape
    return fine.new_empty((b, 9, h, w))


@torch.library.custom_op("hcformer::local_similarity_backward", mutates_args=())
def local_similarity_backward(
    grad: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, need_fine: bool, need_coarse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``local_similarity``: d fine = gather(coarse, grad), d coarse = scatter(fine, grad).

    Each gradient has the memory format of its input; a gradient not needed is an empty tensor.
    """
    g, c = _fine_grid_of(fine), fine.shape[1]
    d_fine, d_coarse = fine.new_empty(0), coarse.new_empty(0)
    kernels = _kernels_for(fine)
    if kernels is not None:
        if need_fine:
            d_fine = kernels.gather(coarse, grad, _channels_last(fine))
        if need_coarse:
            d_coarse = kernels.scatter(fine, grad, _channels_last(coarse))
        return d_fine, d_coarse
    with _no_autocast(fine):
        wg = _fine_to_grid(grad, g)
        if need_fine:
            d_fine = _gather(_coarse_to_grid(coarse, g), wg, g, c, _channels_last(fine))
        if need_coarse:
            d_coarse = _scatter(_fine_to_grid(fine, g), wg, g, c, _channels_last(coarse))
    return d_fine, d_coarse


def _empty_grad(t: torch.Tensor, needed: bool, same_format: bool = True) -> torch.Tensor:
    """The fake kernels' gradient of input ``t``: an empty tensor when not ``needed``, else t's
    shape in t's memory format (``same_format``) or contiguous."""
    if not needed:
        return t.new_empty(0)
    return _empty_nchw(t, t.shape, same_format and _channels_last(t))


@local_similarity_backward.register_fake
def _(grad, fine, coarse, need_fine, need_coarse):
    return _empty_grad(fine, need_fine), _empty_grad(coarse, need_coarse)


@torch.library.custom_op("hcformer::local_decode", mutates_args=())
def local_decode(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [B, C, H, W] = sum_k weights[:, k] * x[:, candidate k] (eq. 5), in x's memory format."""
    kernels = _kernels_for(x)
    if kernels is not None:
        return kernels.gather(x, weights, _channels_last(x))
    g, c = _fine_grid_of(weights), x.shape[1]
    with _no_autocast(x):
        return _gather(_coarse_to_grid(x, g), _fine_to_grid(weights, g), g, c, _channels_last(x))


@local_decode.register_fake
def _(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    b, _, h, w = weights.shape
    return _empty_nchw(x, (b, x.shape[1], h, w), _channels_last(x))


# Mask losses read only the matched queries' masks: in training most channels of the decoded
# masks get no gradient. Channels never mix in eq. (5), so a channel without gradient adds
# nothing to d weights and has d x = 0: below this fraction of live channels the backward runs
# on each image's live channels only (the same sums, without the zero terms).
SPARSE_BACKWARD_BELOW = 0.5


@torch.library.custom_op("hcformer::local_decode_backward", mutates_args=())
def local_decode_backward(
    grad: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, need_x: bool, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``local_decode``: d x = scatter(grad, weights), d weights = similarity(grad, x).

    d x has the memory format of x; a gradient not needed is an empty tensor.
    """
    kernels = _kernels_for(x)
    if kernels is not None:  # dense: picking live channels would sync the device
        return _kernel_decode_backward(kernels, grad, x, weights, need_x, need_weights)
    live = grad.flatten(2).ne(0).any(-1)  # [B, C]: channels that receive any gradient
    if live.float().mean() < SPARSE_BACKWARD_BELOW:  # (an empty grad's mean is nan: dense)
        return _live_channels_backward(grad, x, weights, live, need_x, need_weights)
    return _dense_backward(grad, x, weights, need_x, need_weights)


def _kernel_decode_backward(
    kernels: ModuleType,
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    need_x: bool,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``local_decode_backward`` on the Triton kernels: d x = scatter, d weights = similarity."""
    d_x = kernels.scatter(grad, weights, _channels_last(x)) if need_x else x.new_empty(0)
    d_w = kernels.similarity(grad, x) if need_weights else weights.new_empty(0)
    return d_x, d_w


def _dense_backward(
    grad: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, need_x: bool, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    g, c = _fine_grid_of(weights), x.shape[1]
    d_x, d_w = x.new_empty(0), weights.new_empty(0)
    with _no_autocast(x):
        gg = _fine_to_grid(grad, g)  # shared by both
        if need_x:
            d_x = _scatter(gg, _fine_to_grid(weights, g), g, c, _channels_last(x))
        if need_weights:
            d_w = _similarity(gg, _coarse_to_grid(x, g), g, c)
    return d_x, d_w


def _live_channels_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    live: torch.Tensor,
    need_x: bool,
    need_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_dense_backward`` image by image on the channels in ``live`` [B, C]; zero elsewhere."""
    d_x = torch.zeros_like(x) if need_x else x.new_empty(0)
    d_w = torch.zeros_like(weights) if need_weights else weights.new_empty(0)
    for b in range(grad.shape[0]):
        idx = live[b].nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        dx_b, dw_b = _dense_backward(
            grad[b : b + 1, idx].contiguous(),
            x[b : b + 1, idx].contiguous(),
            weights[b : b + 1],
            need_x,
            need_weights,
        )
        if need_x:
            d_x[b, idx] = dx_b[0]
        if need_weights:
            d_w[b] = dw_b[0]
    return d_x, d_w


@local_decode_backward.register_fake
def _(grad, x, weights, need_x, need_weights):
    return _empty_grad(x, need_x), _empty_grad(weights, need_weights, same_format=False)


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _similarity_autograd(ctx, grad: torch.Tensor):
    fine, coarse = ctx.saved_tensors
    need_fine, need_coarse = ctx.needs_input_grad
    d_fine, d_coarse = local_similarity_backward(grad, fine, coarse, need_fine, need_coarse)
    return (d_fine if need_fine else None), (d_coarse if need_coarse else None)


def _decode_autograd(ctx, grad: torch.Tensor):
    x, weights = ctx.saved_tensors
    need_x, need_weights = ctx.needs_input_grad
    d_x, d_w = local_decode_backward(grad, x, weights, need_x, need_weights)
    return (d_x if need_x else None), (d_w if need_weights else None)


local_similarity.register_autograd(_similarity_autograd, setup_context=_save_inputs)
local_decode.register_autograd(_decode_autograd, setup_context=_save_inputs)


@torch.library.custom_op("hcformer::local_assignment", mutates_args=())
def local_assignment(fine: torch.Tensor, coarse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eq. (3) whole: softmax over the 3x3 candidates of <fine, candidate> / (1e-8 + |scale|),
    candidates outside the coarse map excluded; [B, 9, H, W] (float32 for half features).

    ``clustering`` calls it on the Triton backend, where it is ONE fused kernel (logits, mask,
    scale and softmax) and its backward two kernels and a sum (``triton_kernels.assignment``);
    on the torch backend it computes the same from ``local_similarity`` and ``masked_logits``.
    """
    kernels = _kernels_for(fine)
    if kernels is not None:
        return kernels.assignment(fine, coarse, scale)
    return masked_logits(local_similarity(fine, coarse), scale).softmax(1)


@local_assignment.register_fake
def _(fine: torch.Tensor, coarse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    b, _, h, w = fine.shape
    return fine.new_empty((b, 9, h, w), dtype=assignment_dtype(fine.dtype))


@torch.library.custom_op("hcformer::local_assignment_backward", mutates_args=())
def local_assignment_backward(
    grad: torch.Tensor,
    assignment: torch.Tensor,
    fine: torch.Tensor,
    coarse: torch.Tensor,
    scale: torch.Tensor,
    need_fine: bool,
    need_coarse: bool,
    need_scale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``local_assignment`` from the upstream ``grad`` and the saved ``assignment``.

    Softmax backward dz = a (grad - <a, grad>), d logits dS = dz / (1e-8 + |s|), then d fine and
    d coarse as ``local_similarity_backward`` of dS, and d s = -sign(s) sum(dz z) / (1e-8 + |s|)
    with z the logits (sum_k dz_k z_k = sum_k dz_k log a_k: the logits are not recomputed).
    A gradient not needed is an empty tensor.
    """
    kernels = _kernels_for(fine)
    need = (need_fine, need_coarse, need_scale)
    if kernels is not None:
        return kernels.assignment_backward(grad, assignment, fine, coarse, scale, need)
    denominator = EPS + scale.abs()
    dz = assignment * (grad - (assignment * grad).sum(1, keepdim=True))
    d_fine, d_coarse = local_similarity_backward(
        (dz / denominator).to(fine.dtype), fine, coarse, need_fine, need_coarse
    )
    d_scale = scale.new_empty(0)
    if need_scale:
        log_a = torch.where(assignment > 0, assignment, 1.0).log()
        d_scale = (-(dz * log_a).sum() * scale.sign() / denominator).to(scale.dtype)
    return d_fine, d_coarse, d_scale


@local_assignment_backward.register_fake
def _(grad, assignment, fine, coarse, scale, need_fine, need_coarse, need_scale):
    d_scale = scale.new_empty(scale.shape) if need_scale else scale.new_empty(0)
    return _empty_grad(fine, need_fine), _empty_grad(coarse, need_coarse), d_scale


def _save_inputs_and_output(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, output)


def _assignment_autograd(ctx, grad: torch.Tensor):
    fine, coarse, scale, assignment = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = local_assignment_backward(grad, assignment, fine, coarse, scale, *need)
    return tuple(g if n else None for g, n in zip(grads, need))


local_assignment.register_autograd(_assignment_autograd, setup_context=_save_inputs_and_output)


def _fine_macs(shape) -> int:
    b, c, h, w = shape
    return 9 * b * c * h * w


@register_flop_formula(torch.ops.hcformer.local_similarity)
def _similarity_flops(fine_shape, coarse_shape, *args, **kwargs) -> int:
    return 2 * _fine_macs(fine_shape)  # FlopCounterMode counts 2 flops per multiply-add


@register_flop_formula(torch.ops.hcformer.local_decode)
def _decode_flops(x_shape, weights_shape, *args, **kwargs) -> int:
    return 2 * _fine_macs((weights_shape[0], x_shape[1], weights_shape[2], weights_shape[3]))


@register_flop_formula(torch.ops.hcformer.local_assignment)
def _assignment_flops(fine_shape, coarse_shape, scale_shape, *args, **kwargs) -> int:
    return 2 * _fine_macs(fine_shape)  # the similarity; mask, scale and softmax are element-wise


@register_flop_formula(torch.ops.hcformer.local_assignment_backward)
def _assignment_backward_flops(
    grad_shape, a_shape, fine_shape, coarse_shape, scale_shape, need_fine, need_coarse, *a, **kw
):
    return 2 * _fine_macs(fine_shape) * (int(need_fine) + int(need_coarse))


@register_flop_formula(torch.ops.hcformer.local_similarity_backward)
def _similarity_backward_flops(grad_shape, fine_shape, coarse_shape, need_fine, need_coarse, **kw):
    return 2 * _fine_macs(fine_shape) * (int(need_fine) + int(need_coarse))


@register_flop_formula(torch.ops.hcformer.local_decode_backward)
def _decode_backward_flops(grad_shape, x_shape, weights_shape, need_x, need_weights, **kw):
    return 2 * _fine_macs(grad_shape) * (int(need_x) + int(need_weights))


def _eager_kernels(t: torch.Tensor) -> bool:
    """Whether the Triton kernels are called directly (not through the custom ops): when
    nothing needs to see the ops: eager mode on the Triton backend, no dispatch mode (FLOP
    counter, fake tensors) and no tensor subclass. ``torch.library.custom_op``'s dispatch costs about a
    third of a millisecond of host time per call on a GPU machine, several times what its
    kernels take at a stride-4 map; a plain ``autograd.Function`` costs a few microseconds."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
        return False
    return _kernels_for(t) is not None


class _EagerAssignment(torch.autograd.Function):
    """``local_assignment`` and its backward on the Triton kernels, without the custom op."""

    @staticmethod
    def forward(ctx, fine, coarse, scale):
        out = _triton_kernels().assignment(fine, coarse, scale)
        ctx.save_for_backward(fine, coarse, scale, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        fine, coarse, scale, assignment = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _triton_kernels().assignment_backward(grad, assignment, fine, coarse, scale, need)
        return tuple(g if n else None for g, n in zip(grads, need))


class _EagerDecode(torch.autograd.Function):
    """``local_decode`` and its backward on the Triton kernels, without the custom op."""

    @staticmethod
    def forward(ctx, x, weights):
        ctx.save_for_backward(x, weights)
        return _triton_kernels().gather(x, weights, _channels_last(x))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weights = ctx.saved_tensors
        need_x, need_weights = ctx.needs_input_grad
        d_x, d_w = _kernel_decode_backward(
            _triton_kernels(), grad, x, weights, need_x, need_weights
        )
        return (d_x if need_x else None), (d_w if need_weights else None)


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Under autocast the softmax output is float32 while mask logits may be half: compute in the
    # promoted type, as einsum would after its own casts.
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def clustering(
    feat: torch.Tensor, downsampled_feat: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Soft assignment of eq. (3) over the local 3x3 neighbourhood (Sec. 2.4); the default path.

    Same arguments and result as ``hcformer.ops.reference.clustering`` (Listing 1 of the paper,
    plus the authors' masking of candidates outside the map): feat [B, C, H, W] and
    downsampled_feat [B, C, H/2, W/2], both L2-normalised over C; scale the 0-d trainable s.
    Returns [B, 9, H, W], softmax over the 3x3 candidates in ``F.unfold`` order (index 4 = parent).
    Cost: 9 * C * H * W multiply-adds per image (``clustering_macs``).
    """
    check_clustering_args(feat, downsampled_feat, scale)
    feat, downsampled_feat = _common_dtype(feat, downsampled_feat)
    if _fused_assignment(feat):  # one Triton kernel for the whole of eq. (3)
        if _eager_kernels(feat):
            return _EagerAssignment.apply(feat, downsampled_feat, scale)
        return local_assignment(feat, downsampled_feat, scale)
    similarity = local_similarity(feat, downsampled_feat)
    return masked_logits(similarity, scale).softmax(1)


def decode(x: torch.Tensor, assignment: torch.Tensor) -> torch.Tensor:
    """Cluster-based decoding of eq. (5); the default path.

    Same arguments and result as ``hcformer.ops.reference.decode`` (Listing 2 of the paper):
    x [B, C, H/2, W/2], assignment [B, 9, H, W] -> [B, C, H, W], each fine value the
    assignment-weighted combination of its parent's 3x3 neighbourhood in x (zero outside).
    Cost: 9 * C * H * W multiply-adds per image (``decode_macs``).
    """
    check_decode_args(x, assignment)
    x, assignment = _common_dtype(x, assignment)
    if _eager_kernels(x):
        return _EagerDecode.apply(x, assignment)
    return local_decode(x, assignment)


def clustering_macs(batch: int, channels: int, height: int, width: int) -> int:
    """Multiply-adds of ``clustering`` for fine maps [batch, channels, height, width]: 9 C H W each.

    (FlopCounterMode counts 2 flops per multiply-add; the paper and fvcore count 1.)
    """
    return 9 * batch * channels * height * width


def decode_macs(batch: int, channels: int, height: int, width: int) -> int:
    """Multiply-adds of ``decode`` producing [batch, channels, height, width]: 9 C H W each."""
    return 9 * batch * channels * height * width
