"""Image priors of images [N, C, H, W]: the total-variation sums of the four neighbour
differences of the DeepInversion reference (Σ|d_k| and Σd_k²), the per-image sums of squares, and
their gradient.

    d1 = x[.., i, j] − x[.., i, j+1]      d2 = x[.., i, j] − x[.., i+1, j]
    d3 = x[.., i+1, j] − x[.., i, j+1]    d4 = x[.., i, j] − x[.., i+1, j+1]

Programs walk the tensor in memory order so loads coalesce: for NCHW a program covers a run of
one (n, c) plane's H*W pixels, for channels_last a run of one (n, h) row's W*C values. Either way
a program's elements belong to a single image n.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check, check_device, check_float

# Elements per program: the row/plane length rounded up to a power of two, within these bounds
# (a 16x16 plane or a 32-wide channels_last row of 3 channels would leave most of 1024 lanes idle).
_MIN_BLOCK, _MAX_BLOCK = 128, 1024


@triton.jit
def _coordinates(C, H, W, inner_size, tiles_per_outer,
                 CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """(n, c, h, w, in_range) of this program's elements; n is a scalar, c, h or w may be."""
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
def _image_prior_sums_kernel(x_ptr, partial_ptr, C, H, W, inner_size, tiles_per_outer,
                             stride_n, stride_c, stride_h, stride_w,
                             CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Row pid of the [programs, 9] partials: Σ|d_k|, Σd_k² over the elements this program
    anchors (element (i, j) anchors the differences d_k(i, j) written above), then Σx² of its
    elements."""
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

    row = partial_ptr + tl.program_id(0).to(tl.int64) * 9
    tl.store(row + 0, tl.sum(tl.abs(d1), 0))
    tl.store(row + 1, tl.sum(tl.abs(d2), 0))
    tl.store(row + 2, tl.sum(tl.abs(d3), 0))
    tl.store(row + 3, tl.sum(tl.abs(d4), 0))
    tl.store(row + 4, tl.sum(d1 * d1, 0))
    tl.store(row + 5, tl.sum(d2 * d2, 0))
    tl.store(row + 6, tl.sum(d3 * d3, 0))
    tl.store(row + 7, tl.sum(d4 * d4, 0))
    tl.store(row + 8, tl.sum(x * x, 0))


@triton.jit
def _term(first, second, valid, l1_coef, l2_coef):
    """l1_coef·sign(d) + l2_coef·d of d = first − second where the difference exists, else 0;
    sign(0) = 0."""
    d = first - second
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    return tl.where(valid, l1_coef * sign + l2_coef * d, 0.0)


@triton.jit
def _image_prior_backward_kernel(x_ptr, tv_coef_ptr, sq_coef_ptr, dx_ptr,
                                 C, H, W, inner_size, tiles_per_outer,
                                 x_stride_n, x_stride_c, x_stride_h, x_stride_w,
                                 dx_stride_n, dx_stride_c, dx_stride_h, dx_stride_w,
                                 CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Each element gathers +f_k(d_k) of the differences it is the first operand of and −f_k(d_k)
    of those it is the second operand of, from its eight neighbours (f_k(d) = tv_coef[0, k]·sign(d)
    + tv_coef[1, k]·d), plus sq_coef[n]·x."""
    acc = tv_coef_ptr.dtype.element_ty
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
    l1_coef = tl.load(tv_coef_ptr + 0)
    l2_coef = tl.load(tv_coef_ptr + 4)
    dx = (_term(x, right, has_right, l1_coef, l2_coef)
          - _term(left, x, has_left, l1_coef, l2_coef))
    # d2(i, j) = x(i, j) − x(i+1, j): first at (i, j), second at (i−1, j).
    l1_coef = tl.load(tv_coef_ptr + 1)
    l2_coef = tl.load(tv_coef_ptr + 5)
    dx += (_term(x, down, has_down, l1_coef, l2_coef)
           - _term(up, x, has_up, l1_coef, l2_coef))
    # d3(i, j) = x(i+1, j) − x(i, j+1): first at (i−1, j), second at (i, j−1).
    l1_coef = tl.load(tv_coef_ptr + 2)
    l2_coef = tl.load(tv_coef_ptr + 6)
    dx += (_term(x, up_right, has_up & has_right, l1_coef, l2_coef)
           - _term(down_left, x, has_down & has_left, l1_coef, l2_coef))
    # d4(i, j) = x(i, j) − x(i+1, j+1): first at (i, j), second at (i−1, j−1).
    l1_coef = tl.load(tv_coef_ptr + 3)
    l2_coef = tl.load(tv_coef_ptr + 7)
    dx += (_term(x, down_right, has_down & has_right, l1_coef, l2_coef)
           - _term(up_left, x, has_up & has_left, l1_coef, l2_coef))
    # One image per program (see _coordinates), so its square coefficient is a scalar.
    dx += tl.load(sq_coef_ptr + n) * x

    dx_offsets = _offsets(n, c, h, w, dx_stride_n, dx_stride_c, dx_stride_h, dx_stride_w)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=in_range)


def _check_x(x):
    check(x.dim() == 4, f"expected images [N, C, H, W], got {tuple(x.shape)}")
    check_float(x, "x")


def _launch_geometry(x):
    """(channels_last, inner_size, tiles_per_outer, programs, block): channels_last when c, not w,
    is the fastest-moving index in memory."""
    N, C, H, W = x.shape
    channels_last = C > 1 and x.stride(1) < x.stride(3)
    outer_size, inner_size = (N * H, W * C) if channels_last else (N * C, H * W)
    block = max(_MIN_BLOCK, min(_MAX_BLOCK, triton.next_power_of_2(inner_size)))
    # Inner indices are int32 in the kernels: the last tile's lanes must stay below 2^31.
    check(inner_size <= 2**31 - 1 - block,
          f"an image row or plane of {inner_size} elements is too large")
    tiles_per_outer = triton.cdiv(inner_size, block)
    return channels_last, inner_size, tiles_per_outer, outer_size * tiles_per_outer, block


def image_prior_sums(x):
    _check_x(x)
    acc = acc_dtype(x.dtype)
    N = x.shape[0]
    if x.numel() == 0:
        return (torch.zeros((2, 4), dtype=acc, device=x.device),
                torch.zeros(N, dtype=acc, device=x.device))
    channels_last, inner_size, tiles_per_outer, programs, block = _launch_geometry(x)
    # Row p: Σ|d1..d4|, Σd1²..d4², Σx² of program p's elements.
    partials = torch.empty((programs, 9), dtype=acc, device=x.device)
    _image_prior_sums_kernel[(programs,)](
        x, partials, x.shape[1], x.shape[2], x.shape[3], inner_size, tiles_per_outer, *x.stride(),
        CHANNELS_LAST=channels_last, BLOCK=block, num_warps=max(1, block // 256))
    tv = partials[:, :8].sum(0).view(2, 4)
    # Programs are numbered outer-major and the outer index is n-major in both layouts, so each
    # image's programs are one contiguous block of rows, the same number for every image.
    sq = partials[:, 8].view(N, -1).sum(1)
    return tv, sq


def image_prior_backward(x, tv_coef, sq_coef):
    _check_x(x)
    N = x.shape[0]
    check(tv_coef.shape == (2, 4), f"tv_coef must have shape (2, 4), got {tuple(tv_coef.shape)}")
    check(sq_coef.shape == (N,), f"sq_coef must have shape ({N},), got {tuple(sq_coef.shape)}")
    check_device(x, tv_coef=tv_coef, sq_coef=sq_coef)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    # Read as contiguous acc values; a no-op for the acc tensors the contract promises.
    acc = acc_dtype(x.dtype)
    tv_coef = tv_coef.to(acc).contiguous()
    sq_coef = sq_coef.to(acc).contiguous()
    channels_last, inner_size, tiles_per_outer, programs, block = _launch_geometry(x)
    _image_prior_backward_kernel[(programs,)](
        x, tv_coef, sq_coef, dx, x.shape[1], x.shape[2], x.shape[3], inner_size, tiles_per_outer,
        *x.stride(), *dx.stride(),
        CHANNELS_LAST=channels_last, BLOCK=block, num_warps=max(1, block // 256))
    return dx
