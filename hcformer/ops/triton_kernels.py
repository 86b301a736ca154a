"""Fused Triton kernels for the three local primitives of eq. (3) and eq. (5).

The primitives of ``hcformer.ops.fast`` (fine map [B, C, H, W], coarse map [B, C, h, w], H = 2h,
W = 2w; candidate k = 3 dy + dx of fine pixel (Y, X) is the coarse cell (Y//2 + dy - 1,
X//2 + dx - 1), zero outside the map):

- ``similarity(fine, coarse)``    S[b, k, Y, X] = sum_c fine[b, c, Y, X] coarse[b, c, cand_k]
  (eq. 3 before the softmax; also d weights of eq. 5 with fine = the upstream gradient);
- ``gather(coarse, weights)``     out[b, c, Y, X] = sum_k weights[b, k, Y, X] coarse[b, c, cand_k]
  (eq. 5; also d fine of eq. 3 with weights = the upstream gradient);
- ``scatter(fine, weights)``      the adjoint of ``gather`` in the coarse map (d coarse of eq. 3,
  d x of eq. 5): coarse cell (y, x) collects the 36 children of its 3x3 neighbour cells, each
  weighted by the candidate that points back at (y, x).

and eq. (3) itself, fused (``hcformer::local_assignment`` of ``hcformer.ops.fast``):

- ``assignment(fine, coarse, scale)``  A = softmax_k(S / (1e-8 + |s|)) with candidates outside the
  coarse map excluded (by position), in ONE kernel: the 9 logits stay in registers, the
  assignment [B, 9, H, W] is written once; s is read from its tensor by the kernel (no host sync);
- ``assignment_backward(grad, a, fine, coarse, scale, ...)``  one kernel does the softmax backward
  dS = a (grad - <a, grad>) / (1e-8 + |s|) and d fine = gather(coarse, dS) in the same pass (dS
  stays in registers and is stored only when d coarse needs it), with per-program partial sums of
  d s, added by one small ``sum`` (deterministic: no atomics); d coarse = ``scatter(fine, dS)``.
  d s uses z = log a + const (sum_k dz_k = 0 for a softmax), so the logits are not recomputed.

Each kernel is one pass: a program owns a tile of fine pixels (``scatter``: of coarse cells) of
one image and loops over the channels in blocks, reading every fine value once and the 3x3
coarse neighbourhoods (and, in ``gather`` and ``scatter``, the weights of each channel block after
the first) through the cache, and writes its outputs once.
Loads and stores use the tensors' strides (NCHW, channels-last or any view: no copies), with
masks on every access; the zero padding of the coarse map is a load mask. Accumulation is in
float32 (float64 for float64 inputs); half-precision inputs are read as they are and the results
stored in the input dtype.

CUDA tensors run the compiled kernels. Tensors on the CPU run the same kernels through Triton's
interpreter (NumPy), which needs ``TRITON_INTERPRET=1`` in the environment when triton is first
imported (``triton.jit`` reads it when a kernel, including triton.language's own helpers, is
defined); otherwise they raise RuntimeError. The tests run that way in a subprocess. This module
imports triton at import time: ``hcformer.ops.fast`` imports it lazily, only where triton is
installed.
"""

import torch
import triton
import triton.language as tl

from hcformer.ops.reference import EPS, assignment_dtype

# Tiles (powers of two): (pixels or coarse cells, channels per step, warps), each the fastest of
# a sweep over {32, 64, 128} x {8, 16, 32} x {4, 8} (gather: {64, 128, 256} x {4..32} x {4, 8})
# on an H200 at the stride-4 map of an 800x1216 image (fine 200x304, C 128 / 100, float32).
# The candidate axis is padded from 9 to KPAD lanes (masked) where it is a tensor axis.
KPAD = 16
SIMILARITY_TILE = (64, 8, 4)
GATHER_TILE = (256, 8, 4)  # output NCHW: many pixels, few channels per step
GATHER_TILE_CHANNELS_LAST = (64, 16, 8)
SCATTER_TILE = (128, 16, 8)
ASSIGNMENT_TILE = (32, 16, 4)
ASSIGNMENT_BACKWARD_TILE = (32, 32, 8)


@triton.jit
def _tile(pid, rows, cols, BLOCK: tl.constexpr):
    """Program ``pid``'s image b and its tile of BLOCK positions (y, x) in a rows x cols map, row
    after row (in_p: the position is in the map)."""
    blocks = tl.cdiv(rows * cols, BLOCK)
    b = (pid // blocks).to(tl.int64)
    p = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    in_p = p < rows * cols
    return b, p // cols, p % cols, in_p


@triton.jit
def _neighbourhood(pid, H, W, h, w, BLOCK_P: tl.constexpr, KPAD: tl.constexpr):
    """Program ``pid``'s image b, tile of fine pixels (y, x) and their candidate cells (cy, cx)."""
    b, y, x, in_p = _tile(pid, H, W, BLOCK_P)
    k = tl.arange(0, KPAD)
    cy = y[:, None] // 2 + k[None, :] // 3 - 1  # [P, K]
    cx = x[:, None] // 2 + k[None, :] % 3 - 1
    inside = in_p[:, None] & (k[None, :] < 9) & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    return b, y, x, in_p, k, cy, cx, inside


@triton.jit
def _store_channels(o_ptr, c, s_oc, value, in_p, in_c):
    """Store ``value`` [P, C] at ``o_ptr`` [P] + channel ``c`` * ``s_oc``, in the output dtype."""
    mask = in_p[:, None] & in_c[None, :]
    tl.store(o_ptr[:, None] + c[None, :] * s_oc, value.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_candidates(fine, coarse, C, nb, s_f, s_c, BLOCK_P, BLOCK_C: tl.constexpr, KPAD, ACC):
    """[P, K]: <fine[b, :, y, x], coarse[b, :, cy_k, cx_k]> over the channels, in blocks."""
    b, y, x, in_p, k, cy, cx, inside = nb
    f_ptr = fine + b * s_f[0] + y * s_f[2] + x * s_f[3]  # [P]
    c_ptr = coarse + b * s_c[0] + cy * s_c[2] + cx * s_c[3]  # [P, K]
    acc = tl.zeros([BLOCK_P, KPAD], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        f = tl.load(
            f_ptr[:, None] + c[None, :] * s_f[1], mask=in_p[:, None] & in_c[None, :], other=0.0
        )
        q = tl.load(
            c_ptr[:, :, None] + c[None, None, :] * s_c[1],
            mask=inside[:, :, None] & in_c[None, None, :],
            other=0.0,
        )
        acc += tl.sum(f.to(ACC)[:, None, :] * q.to(ACC), axis=2)
    return acc


@triton.jit
def _combine_candidates(src, out, wk, C, nb, s_s, s_o, BLOCK_C: tl.constexpr, ACC):
    """out[b, :, y, x] = sum_k wk[:, k] src[b, :, cy_k, cx_k] (wk [P, K] in ACC), in blocks."""
    b, y, x, in_p, k, cy, cx, inside = nb
    s_ptr = src + b * s_s[0] + cy * s_s[2] + cx * s_s[3]  # [P, K]
    o_ptr = out + b * s_o[0] + y * s_o[2] + x * s_o[3]  # [P]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        q = tl.load(
            s_ptr[:, :, None] + c[None, None, :] * s_s[1],
            mask=inside[:, :, None] & in_c[None, None, :],
            other=0.0,
        )
        _store_channels(o_ptr, c, s_o[1], tl.sum(wk[:, :, None] * q.to(ACC), axis=1), in_p, in_c)


@triton.jit
def _logits_kernel(fine, coarse, scale, out, C, H, W, h, w, s_f, s_c, s_o, EPS: tl.constexpr,
                   SOFTMAX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   KPAD: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """S of eq. (3) before the softmax or, if SOFTMAX, eq. (3) whole: the softmax over the
    candidates inside the map of S / (EPS + |s|) (``scale`` is read only then)."""
    nb = _neighbourhood(tl.program_id(0), H, W, h, w, BLOCK_P, KPAD)
    b, y, x, in_p, k, cy, cx, inside = nb
    out_k = _dot_candidates(fine, coarse, C, nb, s_f, s_c, BLOCK_P, BLOCK_C, KPAD, ACC)
    if SOFTMAX:
        z = out_k / (EPS + tl.abs(tl.load(scale).to(ACC)))
        z = tl.where(inside, z, float("-inf"))  # outside the map (and the padding lanes): weight 0
        top = tl.where(in_p, tl.max(z, axis=1), 0.0)  # the parent (k = 4) is always inside
        e = tl.exp(z - top[:, None])
        total = tl.where(in_p, tl.sum(e, axis=1), 1.0)
        out_k = e / total[:, None]
    o_ptr = out + b * s_o[0] + k[None, :] * s_o[1] + (y * s_o[2] + x * s_o[3])[:, None]
    tl.store(o_ptr, out_k.to(out.dtype.element_ty), mask=in_p[:, None] & (k[None, :] < 9))


@triton.jit
def _gather_kernel(src, weights, out, C, H, W, h, w, s_s, s_w, s_o, BLOCK_P: tl.constexpr,
                   BLOCK_C: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    # The 9 candidates one after the other on [pixels, channels] tiles (no padded candidate
    # axis); each weight is re-read per channel block, from the cache.
    b, y, x, in_p = _tile(tl.program_id(0), H, W, BLOCK_P)
    w_ptr = weights + b * s_w[0] + y * s_w[2] + x * s_w[3]  # [P]
    o_ptr = out + b * s_o[0] + y * s_o[2] + x * s_o[3]  # [P]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for k in tl.static_range(9):
            cy = y // 2 + (k // 3 - 1)
            cx = x // 2 + (k % 3 - 1)
            ok = in_p & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
            wk = tl.load(w_ptr + k * s_w[1], mask=in_p, other=0.0).to(ACC)
            q = tl.load(
                src + b * s_s[0] + (cy * s_s[2] + cx * s_s[3])[:, None] + c[None, :] * s_s[1],
                mask=ok[:, None] & in_c[None, :],
                other=0.0,
            )
            acc += wk[:, None] * q.to(ACC)
        _store_channels(o_ptr, c, s_o[1], acc, in_p, in_c)


@triton.jit
def _assignment_backward_kernel(grad, assignment, coarse, scale, d_fine, d_logits,
                                d_scale_partial, C, H, W, h, w, s_g, s_a, s_c, s_d, s_l,
                                EPS: tl.constexpr, NEED_FINE: tl.constexpr,
                                NEED_LOGITS: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_C: tl.constexpr, KPAD: tl.constexpr,
                                ACC: tl.constexpr):  # fmt: skip
    """Backward of eq. (3): dS (stored if NEED_LOGITS), d fine = gather(coarse, dS), d s partial.

    z = S / (EPS + |s|), a = softmax(z): dz = a (g - <a, g>), dS = dz / (EPS + |s|) and
    d s = -sign(s) / (EPS + |s|) sum dz z, where sum_k dz_k z_k = sum_k dz_k log a_k because
    log a_k = z_k - logsumexp(z) and sum_k dz_k = 0 (a_k = 0: no term, dz_k = 0 there).
    """
    pid = tl.program_id(0)
    nb = _neighbourhood(pid, H, W, h, w, BLOCK_P, KPAD)
    b, y, x, in_p, k, cy, cx, inside = nb
    valid = in_p[:, None] & (k[None, :] < 9)
    pix = (y * s_a[2] + x * s_a[3])[:, None]
    a = tl.load(assignment + b * s_a[0] + k[None, :] * s_a[1] + pix, mask=valid, other=0.0).to(ACC)
    pix = (y * s_g[2] + x * s_g[3])[:, None]
    g = tl.load(grad + b * s_g[0] + k[None, :] * s_g[1] + pix, mask=valid, other=0.0).to(ACC)
    s = tl.load(scale).to(ACC)
    denominator = EPS + tl.abs(s)
    dz = a * (g - tl.sum(a * g, axis=1)[:, None])
    log_a = tl.log(tl.where(a > 0, a, 1.0))
    dz_z = tl.sum(tl.sum(dz * log_a, axis=1), axis=0)
    sign = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0)).to(ACC)
    tl.store(d_scale_partial + pid, -sign * dz_z / denominator)
    ds = dz / denominator
    if NEED_LOGITS:
        pix = (y * s_l[2] + x * s_l[3])[:, None]
        tl.store(
            d_logits + b * s_l[0] + k[None, :] * s_l[1] + pix,
            ds.to(d_logits.dtype.element_ty),
            mask=valid,
        )
    if NEED_FINE:
        _combine_candidates(coarse, d_fine, ds, C, nb, s_c, s_d, BLOCK_C, ACC)


@triton.jit
def _scatter_kernel(src, weights, out, C, H, W, h, w, s_s, s_w, s_o, BLOCK_P: tl.constexpr,
                    BLOCK_C: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    # A program owns a tile of BLOCK_P coarse cells.
    b, cy, cx, in_m = _tile(tl.program_id(0), h, w, BLOCK_P)
    child = tl.arange(0, 4)
    s_base = src + b * s_s[0]
    w_base = weights + b * s_w[0]
    o_ptr = out + b * s_o[0] + cy * s_o[2] + cx * s_o[3]  # [M]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        # Cell (cy, cx) is candidate k = 3 dy + dx of the children of parent cell
        # (cy - dy + 1, cx - dx + 1).
        for k in tl.static_range(9):
            py = cy - (k // 3 - 1)
            px = cx - (k % 3 - 1)
            ok = in_m & (py >= 0) & (py < h) & (px >= 0) & (px < w)  # [M]
            fy = 2 * py[:, None] + child[None, :] // 2  # [M, 4]
            fx = 2 * px[:, None] + child[None, :] % 2
            ok4 = ok[:, None] & (child[None, :] < 4)
            wk = tl.load(w_base + k * s_w[1] + fy * s_w[2] + fx * s_w[3], mask=ok4, other=0.0)
            g = tl.load(
                s_base + (fy * s_s[2] + fx * s_s[3])[:, :, None] + c[None, None, :] * s_s[1],
                mask=ok4[:, :, None] & in_c[None, None, :],
                other=0.0,
            )
            acc += tl.sum(wk.to(ACC)[:, :, None] * g.to(ACC), axis=1)
        _store_channels(o_ptr, c, s_o[1], acc, in_m, in_c)


# Whether triton.jit gives interpreted kernels: TRITON_INTERPRET=1 when triton was imported (the
# interpreter also needs triton.language's own jitted helpers, decorated at that import).
INTERPRETED = bool(triton.knobs.runtime.interpret)


def _launch(kernel, grid: int, device: torch.device, *args, **meta) -> None:
    if grid == 0:
        return
    num_warps = meta.pop("num_warps")
    if device.type == "cuda" and not INTERPRETED:
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **meta, num_warps=num_warps)
        return
    if not INTERPRETED:
        raise RuntimeError(
            f"hcformer.ops.triton_kernels: tensors on {device} need Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before triton is imported"
        )
    kernel[(grid,)](*args, **meta)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_c(channels: int, block: int) -> int:
    return max(4, min(block, triton.next_power_of_2(max(channels, 1))))


def _empty(like: torch.Tensor, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _logits(fine: torch.Tensor, coarse: torch.Tensor, scale: torch.Tensor | None, dtype, tile):
    """[B, 9, H, W] (contiguous) of ``_logits_kernel``: S, or the softmax when ``scale`` is given."""
    b, c, hh, ww = fine.shape
    h, w = coarse.shape[2:]
    out = torch.empty((b, 9, hh, ww), dtype=dtype, device=fine.device)
    block_p, block_c, warps = tile
    grid = b * triton.cdiv(hh * ww, block_p)
    scale_ptr = out if scale is None else scale  # an unused pointer for S alone
    _launch(
        _logits_kernel, grid, fine.device, fine, coarse, scale_ptr, out, c, hh, ww, h, w,
        fine.stride(), coarse.stride(), out.stride(), EPS=EPS, SOFTMAX=scale is not None,
        BLOCK_P=block_p, BLOCK_C=_block_c(c, block_c), KPAD=KPAD, ACC=_acc(dtype), num_warps=warps,
    )  # fmt: skip
    return out


def similarity(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """S [B, 9, H, W] (contiguous): <fine[:, :, Y, X], coarse[:, :, candidate k of (Y, X)]>."""
    return _logits(fine, coarse, None, fine.dtype, SIMILARITY_TILE)


def _weighted_sum(kernel, src: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, tile):
    """Launch ``_gather_kernel`` (a program per tile of fine pixels) or ``_scatter_kernel`` (per
    tile of coarse cells) from ``src`` and ``weights`` into ``out``; returns ``out``."""
    b, c = src.shape[:2]
    hh, ww = weights.shape[2:]  # the fine map's size
    block, block_c, warps = tile
    grid = b * triton.cdiv(out.shape[2] * out.shape[3], block)
    _launch(
        kernel, grid, src.device, src, weights, out, c, hh, ww, hh // 2, ww // 2,
        src.stride(), weights.stride(), out.stride(),
        BLOCK_P=block, BLOCK_C=_block_c(c, block_c), ACC=_acc(src.dtype), num_warps=warps,
    )  # fmt: skip
    return out


def gather(src: torch.Tensor, weights: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """out [B, C, H, W] = sum_k weights[:, k] * src[:, :, candidate k], in the requested format."""
    b, c = src.shape[:2]
    out = _empty(src, (b, c, *weights.shape[2:]), channels_last)
    tile = GATHER_TILE_CHANNELS_LAST if channels_last else GATHER_TILE
    return _weighted_sum(_gather_kernel, src, weights, out, tile)


def scatter(fine: torch.Tensor, weights: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The adjoint of ``gather`` in its first argument: a new [B, C, H/2, W/2]."""
    b, c, hh, ww = fine.shape
    out = _empty(fine, (b, c, hh // 2, ww // 2), channels_last)
    return _weighted_sum(_scatter_kernel, fine, weights, out, SCATTER_TILE)


def assignment(fine: torch.Tensor, coarse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Eq. (3) in one kernel: A [B, 9, H, W] (contiguous), softmax over the candidates inside the
    map of <fine, candidate> / (1e-8 + |scale|); candidates outside the map get exactly 0."""
    return _logits(fine, coarse, scale, assignment_dtype(fine.dtype), ASSIGNMENT_TILE)


def assignment_backward(
    grad: torch.Tensor,
    a: torch.Tensor,
    fine: torch.Tensor,
    coarse: torch.Tensor,
    scale: torch.Tensor,
    need: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``assignment`` (d fine, d coarse, d scale) from the upstream ``grad`` and the
    saved assignment ``a``; those not in ``need`` (fine, coarse, scale) are empty tensors.

    One kernel: the softmax backward, d fine and the per-program partial sums of d scale; then
    one ``sum`` of the partials (deterministic, unlike atomics) and, for d coarse, ``scatter``.
    """
    need_fine, need_coarse, need_scale = need
    b, c, hh, ww = fine.shape
    h, w = coarse.shape[2:]
    d_fine = _empty(fine, fine.shape, _is_channels_last(fine)) if need_fine else fine.new_empty(0)
    d_logits = torch.empty_like(a, memory_format=torch.contiguous_format) if need_coarse else a
    block_p, block_c, warps = ASSIGNMENT_BACKWARD_TILE
    grid = b * triton.cdiv(hh * ww, block_p)
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    partial = torch.empty(grid, dtype=acc_dtype, device=a.device)  # d s of each program
    out_fine = d_fine if need_fine else a  # an unused pointer when not needed
    _launch(
        _assignment_backward_kernel, grid, fine.device, grad, a, coarse, scale, out_fine, d_logits,
        partial, c, hh, ww, h, w, grad.stride(), a.stride(), coarse.stride(),
        d_fine.stride() if need_fine else (0, 0, 0, 0), d_logits.stride(), EPS=EPS,
        NEED_FINE=need_fine, NEED_LOGITS=need_coarse, BLOCK_P=block_p,
        BLOCK_C=_block_c(c, block_c), KPAD=KPAD, ACC=_acc(a.dtype), num_warps=warps,
    )  # fmt: skip
    d_coarse = scatter(fine, d_logits, _is_channels_last(coarse)) if need_coarse else None
    d_scale = partial.sum().to(scale.dtype).reshape(scale.shape) if need_scale else None
    return (
        d_fine,
        coarse.new_empty(0) if d_coarse is None else d_coarse,
        scale.new_empty(0) if d_scale is None else d_scale,
    )


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
