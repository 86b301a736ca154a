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

Each kernel is one pass: a program owns a tile of fine pixels (``scatter``: of coarse cells) of
one image, loads the tile's weights once and loops over the channels in blocks, reading every
fine value once and the 3x3 coarse neighbourhoods through the cache, and writes its outputs once.
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

# Tile sizes (powers of two). The candidate axis is padded from 9 to KPAD lanes (masked).
KPAD = 16
SIMILARITY_BLOCK_P, SIMILARITY_BLOCK_C = 32, 16  # fine pixels x channels per step
GATHER_BLOCK_P, GATHER_BLOCK_C = 32, 16
SCATTER_BLOCK_M, SCATTER_BLOCK_C = 32, 32  # coarse cells x channels (x 4 children)
NUM_WARPS = 4


@triton.jit
def _similarity_kernel(
    fine,
    coarse,
    out,
    C,
    H,
    W,
    h,
    w,
    s_fb,
    s_fc,
    s_fh,
    s_fw,
    s_cb,
    s_cc,
    s_ch,
    s_cw,
    s_ob,
    s_ok,
    s_oh,
    s_ow,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    KPAD: tl.constexpr,
    ACC: tl.constexpr,
):
    blocks = tl.cdiv(H * W, BLOCK_P)
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    p = (pid % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < H * W
    y = p // W
    x = p % W
    k = tl.arange(0, KPAD)
    cy = y[:, None] // 2 + k[None, :] // 3 - 1  # [P, K]
    cx = x[:, None] // 2 + k[None, :] % 3 - 1
    inside = in_p[:, None] & (k[None, :] < 9) & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    f_ptr = fine + b * s_fb + y * s_fh + x * s_fw  # [P]
    c_ptr = coarse + b * s_cb + cy * s_ch + cx * s_cw  # [P, K]
    acc = tl.zeros([BLOCK_P, KPAD], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        f = tl.load(
            f_ptr[:, None] + c[None, :] * s_fc, mask=in_p[:, None] & in_c[None, :], other=0.0
        )
        q = tl.load(
            c_ptr[:, :, None] + c[None, None, :] * s_cc,
            mask=inside[:, :, None] & in_c[None, None, :],
            other=0.0,
        )
        acc += tl.sum(f.to(ACC)[:, None, :] * q.to(ACC), axis=2)
    o_ptr = out + b * s_ob + k[None, :] * s_ok + (y * s_oh + x * s_ow)[:, None]
    tl.store(o_ptr, acc.to(out.dtype.element_ty), mask=in_p[:, None] & (k[None, :] < 9))


@triton.jit
def _gather_kernel(
    src,
    weights,
    out,
    C,
    H,
    W,
    h,
    w,
    s_sb,
    s_sc,
    s_sh,
    s_sw,
    s_wb,
    s_wk,
    s_wh,
    s_ww,
    s_ob,
    s_oc,
    s_oh,
    s_ow,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    KPAD: tl.constexpr,
    ACC: tl.constexpr,
):
    blocks = tl.cdiv(H * W, BLOCK_P)
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    p = (pid % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < H * W
    y = p // W
    x = p % W
    k = tl.arange(0, KPAD)
    cy = y[:, None] // 2 + k[None, :] // 3 - 1  # [P, K]
    cx = x[:, None] // 2 + k[None, :] % 3 - 1
    inside = in_p[:, None] & (k[None, :] < 9) & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
    wk = tl.load(
        weights + b * s_wb + k[None, :] * s_wk + (y * s_wh + x * s_ww)[:, None],
        mask=in_p[:, None] & (k[None, :] < 9),
        other=0.0,
    ).to(ACC)
    s_ptr = src + b * s_sb + cy * s_sh + cx * s_sw  # [P, K]
    o_ptr = out + b * s_ob + y * s_oh + x * s_ow  # [P]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        q = tl.load(
            s_ptr[:, :, None] + c[None, None, :] * s_sc,
            mask=inside[:, :, None] & in_c[None, None, :],
            other=0.0,
        )
        r = tl.sum(wk[:, :, None] * q.to(ACC), axis=1)  # [P, C]
        tl.store(
            o_ptr[:, None] + c[None, :] * s_oc,
            r.to(out.dtype.element_ty),
            mask=in_p[:, None] & in_c[None, :],
        )


@triton.jit
def _scatter_kernel(
    src,
    weights,
    out,
    C,
    H,
    W,
    h,
    w,
    s_sb,
    s_sc,
    s_sh,
    s_sw,
    s_wb,
    s_wk,
    s_wh,
    s_ww,
    s_ob,
    s_oc,
    s_oh,
    s_ow,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    blocks = tl.cdiv(h * w, BLOCK_M)
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    m = (pid % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = m < h * w
    cy = m // w
    cx = m % w
    child = tl.arange(0, 4)
    s_base = src + b * s_sb
    w_base = weights + b * s_wb
    o_ptr = out + b * s_ob + cy * s_oh + cx * s_ow  # [M]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < C
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
        # Cell (cy, cx) is candidate k = 3 dy + dx of the children of parent cell
        # (cy - dy + 1, cx - dx + 1).
        for k in tl.static_range(9):
            py = cy - (k // 3 - 1)
            px = cx - (k % 3 - 1)
            ok = in_m & (py >= 0) & (py < h) & (px >= 0) & (px < w)  # [M]
            fy = 2 * py[:, None] + child[None, :] // 2  # [M, 4]
            fx = 2 * px[:, None] + child[None, :] % 2
            ok4 = ok[:, None] & (child[None, :] < 4)
            wk = tl.load(w_base + k * s_wk + fy * s_wh + fx * s_ww, mask=ok4, other=0.0)
            g = tl.load(
                s_base + (fy * s_sh + fx * s_sw)[:, :, None] + c[None, None, :] * s_sc,
                mask=ok4[:, :, None] & in_c[None, None, :],
                other=0.0,
            )
            acc += tl.sum(wk.to(ACC)[:, :, None] * g.to(ACC), axis=1)
        tl.store(
            o_ptr[:, None] + c[None, :] * s_oc,
            acc.to(out.dtype.element_ty),
            mask=in_m[:, None] & in_c[None, :],
        )


# Whether triton.jit gives interpreted kernels: TRITON_INTERPRET=1 when triton was imported (the
# interpreter also needs triton.language's own jitted helpers, decorated at that import).
INTERPRETED = bool(triton.knobs.runtime.interpret)


def _launch(kernel, grid: int, device: torch.device, *args, **meta) -> None:
    if grid == 0:
        return
    if device.type == "cuda" and not INTERPRETED:
        with torch.cuda.device(device):
            kernel[(grid,)](*args, **meta, num_warps=NUM_WARPS)
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


def similarity(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """S [B, 9, H, W] (contiguous): <fine[:, :, Y, X], coarse[:, :, candidate k of (Y, X)]>."""
    b, c, hh, ww = fine.shape
    h, w = coarse.shape[2:]
    out = torch.empty((b, 9, hh, ww), dtype=fine.dtype, device=fine.device)
    block_c = _block_c(c, SIMILARITY_BLOCK_C)
    grid = b * triton.cdiv(hh * ww, SIMILARITY_BLOCK_P)
    _launch(
        _similarity_kernel,
        grid,
        fine.device,
        fine,
        coarse,
        out,
        c,
        hh,
        ww,
        h,
        w,
        *fine.stride(),
        *coarse.stride(),
        *out.stride(),
        BLOCK_P=SIMILARITY_BLOCK_P,
        BLOCK_C=block_c,
        KPAD=KPAD,
        ACC=_acc(fine.dtype),
    )
    return out


def gather(src: torch.Tensor, weights: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """out [B, C, H, W] = sum_k weights[:, k] * src[:, :, candidate k], in the requested format."""
    b, c, h, w = src.shape
    hh, ww = weights.shape[2:]
    out = _empty(src, (b, c, hh, ww), channels_last)
    block_c = _block_c(c, GATHER_BLOCK_C)
    grid = b * triton.cdiv(hh * ww, GATHER_BLOCK_P)
    _launch(
        _gather_kernel,
        grid,
        src.device,
        src,
        weights,
        out,
        c,
        hh,
        ww,
        h,
        w,
        *src.stride(),
        *weights.stride(),
        *out.stride(),
        BLOCK_P=GATHER_BLOCK_P,
        BLOCK_C=block_c,
        KPAD=KPAD,
        ACC=_acc(src.dtype),
    )
    return out


def scatter(fine: torch.Tensor, weights: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The adjoint of ``gather`` in its first argument: a new [B, C, H/2, W/2]."""
    b, c, hh, ww = fine.shape
    h, w = hh // 2, ww // 2
    out = _empty(fine, (b, c, h, w), channels_last)
    block_c = _block_c(c, SCATTER_BLOCK_C)
    grid = b * triton.cdiv(h * w, SCATTER_BLOCK_M)
    _launch(
        _scatter_kernel,
        grid,
        fine.device,
        fine,
        weights,
        out,
        c,
        hh,
        ww,
        h,
        w,
        *fine.stride(),
        *weights.stride(),
        *out.stride(),
        BLOCK_M=SCATTER_BLOCK_M,
        BLOCK_C=block_c,
        ACC=_acc(fine.dtype),
    )
    return out
