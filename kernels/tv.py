"""Total variation of images [N, C, H, W]: the sums of the four neighbour differences of the
DeepInversion reference, and their gradient.

    d1 = x[.., i, j] − x[.., i, j+1]      d2 = x[.., i, j] − x[.., i+1, j]
    d3 = x[.., i+1, j] − x[.., i, j+1]    d4 = x[.., i, j] − x[.., i+1, j+1]

Programs walk the tensor in memory order so loads coalesce: for NCHW a program covers a run of
one (n, c) plane's H*W pixels, for channels_last a run of one (n, h) row's W*C values.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check, check_device, check_float

# Elements per program.
_BLOCK = 1024


@triton.jit
def _coordinates(C, H, W, inner_size, tiles_per_outer,
                 CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """(n, c, h, w, in_range) of this program's elements; n, c, h or w may be scalars."""
    pid = tl.program_id(0)
    outer = pid // tiles_per_outer
    inner = (pid % tiles_per_outer) * BLOCK + tl.arange(0, BLOCK)
    in_range = inner < inner_size
    if CHANNELS_LAST:  # outer = (n, h), inner = (w, c)
        n = outer // H
        h = outer % H
        w = inner // C
        c = inner % C
    else:  # outer = (n, c), inner = (h, w)
        n = outer // C
        c = outer % C
        h = inner // W
        w = inner % W
    return n, c, h, w, in_range


@triton.jit
def _offsets(n, c, h, w, stride_n, stride_c, stride_h, stride_w):
    return (n.to(tl.int64) * stride_n + c.to(tl.int64) * stride_c
            + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w)


@triton.jit
def _tv_sums_kernel(x_ptr, partial_ptr, C, H, W, inner_size, tiles_per_outer,
                    stride_n, stride_c, stride_h, stride_w,
                    POWER: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Row pid of the [programs, 4] partials: Σ|d_k|^POWER over the elements this program anchors
    (element (i, j) anchors the differences d_k(i, j) written above)."""
    acc = partial_ptr.dtype.element_ty
    n, c, h, w, in_range = _coordinates(C, H, W, inner_size, tiles_per_outer, CHANNELS_LAST, BLOCK)
    offsets = _offsets(n, c, h, w, stride_n, stride_c, stride_h, stride_w)
    has_right = in_range & (w < W - 1)
    has_down = in_range & (h < H - 1)
    has_diagonal = has_right & has_down

    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(acc)
    right = tl.load(x_ptr + offsets + stride_w, mask=has_right, other=0.0).to(acc)
    down = tl.load(x_ptr + offsets + stride_h, mask=has_down, other=0.0).to(acc)
    down_right = tl.load(x_ptr + offsets + stride_h + stride_w, mask=has_diagonal,
                         other=0.0).to(acc)
    d1 = tl.where(has_right, x - right, 0.0)
    d2 = tl.where(has_down, x - down, 0.0)
    d3 = tl.where(has_diagonal, down - right, 0.0)
    d4 = tl.where(has_diagonal, x - down_right, 0.0)
    if POWER == 1:
        d1, d2, d3, d4 = tl.abs(d1), tl.abs(d2), tl.abs(d3), tl.abs(d4)
    else:
        d1, d2, d3, d4 = d1 * d1, d2 * d2, d3 * d3, d4 * d4

    row = partial_ptr + tl.program_id(0).to(tl.int64) * 4
    tl.store(row + 0, tl.sum(d1, 0))
    tl.store(row + 1, tl.sum(d2, 0))
    tl.store(row + 2, tl.sum(d3, 0))
    tl.store(row + 3, tl.sum(d4, 0))


@triton.jit
def _term(first, second, valid, POWER: tl.constexpr):
    """f(first − second) where the difference exists, else 0; f is the identity (POWER 2) or sign
    with sign(0) = 0 (POWER 1)."""
    d = first - second
    if POWER == 1:
        d = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return tl.where(valid, d, 0.0)


@triton.jit
def _tv_backward_kernel(x_ptr, coef_ptr, dx_ptr, C, H, W, inner_size, tiles_per_outer,
                        x_stride_n, x_stride_c, x_stride_h, x_stride_w,
                        dx_stride_n, dx_stride_c, dx_stride_h, dx_stride_w,
                        POWER: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Each element gathers +coef_k·f(d_k) of the differences it is the first operand of and
    −coef_k·f(d_k) of those it is the second operand of, from its eight neighbours."""
    acc = coef_ptr.dtype.element_ty
    n, c, h, w, in_range = _coordinates(C, H, W, inner_size, tiles_per_outer, CHANNELS_LAST, BLOCK)
    offsets = _offsets(n, c, h, w, x_stride_n, x_stride_c, x_stride_h, x_stride_w)
    has_left = in_range & (w > 0)
    has_right = in_range & (w < W - 1)
    has_up = in_range & (h > 0)
    has_down = in_range & (h < H - 1)
    sw = x_stride_w
    sh = x_stride_h

    x = tl.load(x_ptr + offsets, mask=in_range, other=0.0).to(acc)
    left = tl.load(x_ptr + offsets - sw, mask=has_left, other=0.0).to(acc)
    right = tl.load(x_ptr + offsets + sw, mask=has_right, other=0.0).to(acc)
    up = tl.load(x_ptr + offsets - sh, mask=has_up, other=0.0).to(acc)
    down = tl.load(x_ptr + offsets + sh, mask=has_down, other=0.0).to(acc)
    up_left = tl.load(x_ptr + offsets - sh - sw, mask=has_up & has_left, other=0.0).to(acc)
    up_right = tl.load(x_ptr + offsets - sh + sw, mask=has_up & has_right, other=0.0).to(acc)
    down_left = tl.load(x_ptr + offsets + sh - sw, mask=has_down & has_left, other=0.0).to(acc)
    down_right = tl.load(x_ptr + offsets + sh + sw, mask=has_down & has_right, other=0.0).to(acc)

    # d1(i, j) = x(i, j) − x(i, j+1): first operand at (i, j), second at (i, j−1).
    dx = tl.load(coef_ptr + 0) * (_term(x, right, has_right, POWER)
                                  - _term(left, x, has_left, POWER))
    # d2(i, j) = x(i, j) − x(i+1, j): first at (i, j), second at (i−1, j).
    dx += tl.load(coef_ptr + 1) * (_term(x, down, has_down, POWER)
                                   - _term(up, x, has_up, POWER))
    # d3(i, j) = x(i+1, j) − x(i, j+1): first at (i−1, j), second at (i, j−1).
    dx += tl.load(coef_ptr + 2) * (_term(x, up_right, has_up & has_right, POWER)
                                   - _term(down_left, x, has_down & has_left, POWER))
    # d4(i, j) = x(i, j) − x(i+1, j+1): first at (i, j), second at (i−1, j−1).
    dx += tl.load(coef_ptr + 3) * (_term(x, down_right, has_down & has_right, POWER)
                                   - _term(up_left, x, has_up & has_left, POWER))

    dx_offsets = _offsets(n, c, h, w, dx_stride_n, dx_stride_c, dx_stride_h, dx_stride_w)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=in_range)


def _check_x(x, power):
    check(x.dim() == 4, f"expected images [N, C, H, W], got {tuple(x.shape)}")
    check_float(x, "x")
    check(power in (1, 2), f"power must be 1 or 2, got {power}")


def _launch_geometry(x):
    """(channels_last, inner_size, tiles_per_outer, programs): channels_last when c, not w, is the
    fastest-moving index in memory."""
    N, C, H, W = x.shape
    channels_last = C > 1 and x.stride(1) < x.stride(3)
    outer_size, inner_size = (N * H, W * C) if channels_last else (N * C, H * W)
    check(inner_size < 2**31, f"an image row or plane of {inner_size} elements is too large")
    tiles_per_outer = triton.cdiv(inner_size, _BLOCK)
    return channels_last, inner_size, tiles_per_outer, outer_size * tiles_per_outer


def tv_sums(x, power):
    _check_x(x, power)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        return torch.zeros(4, dtype=acc, device=x.device)
    channels_last, inner_size, tiles_per_outer, programs = _launch_geometry(x)
    partials = torch.empty((programs, 4), dtype=acc, device=x.device)
    _tv_sums_kernel[(programs,)](
        x, partials, x.shape[1], x.shape[2], x.shape[3], inner_size, tiles_per_outer, *x.stride(),
        POWER=power, CHANNELS_LAST=channels_last, BLOCK=_BLOCK, num_warps=4)
    return partials.sum(0)


def tv_backward(x, coef, power):
    _check_x(x, power)
    check(coef.shape == (4,), f"coef must have shape (4,), got {tuple(coef.shape)}")
    check_device(x, coef=coef)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    # Read as 4 contiguous acc values; a no-op for the acc [4] tensor the contract promises.
    coef = coef.to(acc_dtype(x.dtype)).contiguous()
    channels_last, inner_size, tiles_per_outer, programs = _launch_geometry(x)
    _tv_backward_kernel[(programs,)](
        x, coef, dx, x.shape[1], x.shape[2], x.shape[3], inner_size, tiles_per_outer,
        *x.stride(), *dx.stride(),
        POWER=power, CHANNELS_LAST=channels_last, BLOCK=_BLOCK, num_warps=4)
    return dx
