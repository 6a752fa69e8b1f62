"""Per-channel batch statistics (mean, biased variance) and the fused eval-mode BatchNorm that
produces them from the same read of its input, with their backward passes.

Every tensor shaped like `x` is handled as an [N, C, S] view (S = product of the spatial dims),
indexed by its own strides, so contiguous NCHW and channels_last are both read and written in
place. Programs work on [BLOCK_C channels, BLOCK_M elements] tiles, where element m of a channel
is (n, s) = (m // S, m % S) and M = N*S.
"""
import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, check, check_channel_vector, check_device, check_float,
                      spatial_size)

# Elements in one tile.
_TILE = 2048
# Programs the statistics pass aims for: several per SM of a large GPU. More programs would only
# mean more partial results to merge.
_TARGET_PROGRAMS = 1024
# Chunks of partial results the merge kernel reads per step.
_MERGE_BLOCK_K = 32


@triton.jit
def _stats_kernel(x_ptr, mean_part_ptr, m2_part_ptr,
                  y_ptr, weight_ptr, bias_ptr, running_mean_ptr, running_var_ptr, eps,
                  C, S, M, tiles_per_chunk,
                  x_stride_n, x_stride_c, x_stride_s, y_stride_n, y_stride_c, y_stride_s,
                  APPLY_BN: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """(mean, M2) of each channel over one chunk of `tiles_per_chunk` consecutive tiles, written to
    row `chunk` of the [chunks, C] partial tensors; with APPLY_BN also the eval BatchNorm output y
    of those elements."""
    acc = mean_part_ptr.dtype.element_ty
    chunk = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    channels64 = channels.to(tl.int64)

    if APPLY_BN:
        running_mean = tl.load(running_mean_ptr + channels, mask=channel_mask, other=0.0).to(acc)
        running_var = tl.load(running_var_ptr + channels, mask=channel_mask, other=1.0).to(acc)
        scale = 1.0 / tl.sqrt(running_var + eps)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(acc)
        bias = tl.zeros([BLOCK_C], acc)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(acc)

    chunk_start = chunk * tiles_per_chunk * BLOCK_M
    num_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(M - chunk_start, BLOCK_M))
    mean = tl.zeros([BLOCK_C], acc)
    m2 = tl.zeros([BLOCK_C], acc)
    for tile in range(0, num_tiles):
        tile_start = chunk_start + tile * BLOCK_M
        elements = tile_start + tl.arange(0, BLOCK_M)
        mask = channel_mask[:, None] & (elements < M)[None, :]
        n = (elements // S).to(tl.int64)
        s = (elements % S).to(tl.int64)
        x = tl.load(x_ptr + channels64[:, None] * x_stride_c
                    + (n * x_stride_n + s * x_stride_s)[None, :], mask=mask, other=0.0).to(acc)

        # Exact two-pass statistics of the tile (it is in registers), then Chan's merge into the
        # running ones: no E[x²]−E[x]² cancellation anywhere.
        tile_count = tl.minimum(M - tile_start, BLOCK_M).to(acc)
        tile_mean = tl.sum(x, 1) / tile_count
        deviation = tl.where(mask, x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(deviation * deviation, 1)
        # Every earlier tile of the chunk is full: only the last tile of a channel can be partial.
        seen = (tile_start - chunk_start).to(acc)
        total = seen + tile_count
        delta = tile_mean - mean
        mean = mean + delta * (tile_count / total)
        m2 = m2 + tile_m2 + delta * delta * (seen * tile_count / total)

        if APPLY_BN:
            y = (x - running_mean[:, None]) * scale[:, None] + bias[:, None]
            tl.store(y_ptr + channels64[:, None] * y_stride_c
                     + (n * y_stride_n + s * y_stride_s)[None, :],
                     y.to(y_ptr.dtype.element_ty), mask=mask)

    part_offsets = chunk.to(tl.int64) * C + channels
    tl.store(mean_part_ptr + part_offsets, mean, mask=channel_mask)
    tl.store(m2_part_ptr + part_offsets, m2, mask=channel_mask)


@triton.jit
def _chunk_tile(k0, num_chunks, chunk_size, M, C, channels, channel_mask, ACC: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """(mask, element counts, offsets into the [chunks, C] partials) of chunks k0 .. k0+BLOCK_K
    of `channels`."""
    chunks = k0 + tl.arange(0, BLOCK_K)
    mask = (chunks < num_chunks)[:, None] & channel_mask[None, :]
    counts = tl.minimum(chunk_size, M - chunks.to(tl.int64) * chunk_size).to(ACC)
    offsets = chunks.to(tl.int64)[:, None] * C + channels[None, :]
    return mask, counts, offsets


@triton.jit
def _merge_stats_kernel(mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, C, M, num_chunks,
                        chunk_size, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Chan's merge of the per-chunk (count, mean, M2), for all chunks at once: mean = Σ nᵢ·meanᵢ/M,
    M2 = Σ M2ᵢ + nᵢ·(meanᵢ − mean)². Chunk i holds min(chunk_size, M − i·chunk_size) elements."""
    acc = mean_ptr.dtype.element_ty
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C

    weighted_sum = tl.zeros([BLOCK_K, BLOCK_C], acc)
    for k0 in range(0, num_chunks, BLOCK_K):
        mask, counts, offsets = _chunk_tile(k0, num_chunks, chunk_size, M, C, channels,
                                            channel_mask, acc, BLOCK_K)
        part_mean = tl.load(mean_part_ptr + offsets, mask=mask, other=0.0)
        weighted_sum += tl.where(mask, counts[:, None] * part_mean, 0.0)
    mean = tl.sum(weighted_sum, 0) / M

    m2_sum = tl.zeros([BLOCK_K, BLOCK_C], acc)
    for k0 in range(0, num_chunks, BLOCK_K):
        mask, counts, offsets = _chunk_tile(k0, num_chunks, chunk_size, M, C, channels,
                                            channel_mask, acc, BLOCK_K)
        delta = tl.load(mean_part_ptr + offsets, mask=mask, other=0.0) - mean[None, :]
        part_m2 = tl.load(m2_part_ptr + offsets, mask=mask, other=0.0)
        m2_sum += tl.where(mask, part_m2 + counts[:, None] * delta * delta, 0.0)

    tl.store(mean_ptr + channels, mean, mask=channel_mask)
    tl.store(var_ptr + channels, tl.sum(m2_sum, 0) / M, mask=channel_mask)


@triton.jit
def _stats_backward_kernel(x_ptr, grad_y_ptr, dx_ptr, mean_ptr, grad_mean_ptr, grad_var_ptr,
                           weight_ptr, running_var_ptr, eps, C, S, M,
                           x_stride_n, x_stride_c, x_stride_s,
                           grad_y_stride_n, grad_y_stride_c, grad_y_stride_s,
                           dx_stride_n, dx_stride_c, dx_stride_s,
                           HAS_GRAD_Y: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """dx = (grad_mean + 2·grad_var·(x − mean))/M, plus grad_y·w/sqrt(rv + eps) with HAS_GRAD_Y."""
    acc = mean_ptr.dtype.element_ty
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    channels64 = channels.to(tl.int64)
    elements = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = channel_mask[:, None] & (elements < M)[None, :]
    n = (elements // S).to(tl.int64)
    s = (elements % S).to(tl.int64)

    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0).to(acc)
    grad_mean = tl.load(grad_mean_ptr + channels, mask=channel_mask, other=0.0).to(acc)
    grad_var = tl.load(grad_var_ptr + channels, mask=channel_mask, other=0.0).to(acc)
    x = tl.load(x_ptr + channels64[:, None] * x_stride_c
                + (n * x_stride_n + s * x_stride_s)[None, :], mask=mask, other=0.0).to(acc)
    dx = (grad_mean[:, None] + 2.0 * grad_var[:, None] * (x - mean[:, None])) / M

    if HAS_GRAD_Y:
        running_var = tl.load(running_var_ptr + channels, mask=channel_mask, other=1.0).to(acc)
        scale = 1.0 / tl.sqrt(running_var + eps)
        if HAS_WEIGHT:
            scale = scale * tl.load(weight_ptr + channels, mask=channel_mask, other=0.0).to(acc)
        grad_y = tl.load(grad_y_ptr + channels64[:, None] * grad_y_stride_c
                         + (n * grad_y_stride_n + s * grad_y_stride_s)[None, :],
                         mask=mask, other=0.0).to(acc)
        dx += grad_y * scale[:, None]

    tl.store(dx_ptr + channels64[:, None] * dx_stride_c
             + (n * dx_stride_n + s * dx_stride_s)[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _ncs_shape(x):
    return x.shape[0], x.shape[1], spatial_size(x)


def _ncs_input(x):
    """`x` as [N, C, S]: a view for every layout whose spatial dims merge into one stride (NCHW,
    channels_last, any 2-D or 3-D tensor), a copy only for other layouts."""
    return x.reshape(_ncs_shape(x))


def _ncs_output_like(x):
    """(out, target): `out` is empty_like(x) (x's dtype, shape and strides); `target` is the
    [N, C, S] tensor the kernel writes, a view of `out` unless out's spatial dims cannot be merged
    (a dense layout other than NCHW / channels_last), in which case the caller copies target into
    out with `_finish_output`."""
    out = torch.empty_like(x)
    try:
        return out, out.view(_ncs_shape(x))
    except RuntimeError:
        return out, torch.empty(_ncs_shape(x), dtype=x.dtype, device=x.device)


def _finish_output(out, target):
    if target.data_ptr() != out.data_ptr():
        out.copy_(target.view(out.shape))
    return out


def _dense_vector(t, dtype=None):
    """A [C] parameter or gradient as the kernels read it: contiguous (autograd may hand over an
    expanded, stride-0 gradient), optionally in `dtype`. Copies only when needed."""
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).contiguous()


def _tile_shape(C, M, stride_c):
    """(BLOCK_C, BLOCK_M) of a tile of about _TILE elements, long along whichever of channels and
    elements is contiguous in memory so the loads coalesce."""
    if stride_c == 1 and C > 1:  # channels_last, or a 2-D [N, C] batch
        block_c = min(64, triton.next_power_of_2(C))
        return block_c, max(16, min(triton.next_power_of_2(M), _TILE // block_c))
    block_m = max(16, min(triton.next_power_of_2(M), _TILE))
    return max(1, min(triton.next_power_of_2(C), _TILE // block_m)), block_m


def _check_grid(C, M, block_c):
    # Element indices within a channel are int32 in the kernels (a tile's start plus its lanes):
    # the last tile's lanes must stay below 2^31. Channel blocks run on grid axis 1 (<= 65535).
    check(M <= 2**31 - 1 - _TILE,
          f"x has {M} elements per channel, more than this kernel indexes")
    check(triton.cdiv(C, block_c) <= 65535,
          f"x has {C} channels of {M} elements, more than this kernel's grid holds")


def _check_x(x):
    check(x.dim() >= 2, f"expected x of shape [N, C, ...], got {tuple(x.shape)}")
    check_float(x, "x")


def _stats(x, bn=None):
    """(mean, var) of x per channel; with bn = (y, weight, bias, running_mean, running_var, eps)
    also writes the eval BatchNorm output into the [N, C, S] tensor y."""
    N, C, S = _ncs_shape(x)
    M = N * S
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:  # no launch: empty mean and variance are NaN, as in torch
        nan = torch.full((C,), float("nan"), dtype=acc, device=x.device)
        return nan, nan.clone()
    x3 = _ncs_input(x)
    block_c, block_m = _tile_shape(C, M, x3.stride(1))
    _check_grid(C, M, block_c)
    channel_blocks = triton.cdiv(C, block_c)
    num_tiles = triton.cdiv(M, block_m)
    num_chunks = min(num_tiles, triton.cdiv(_TARGET_PROGRAMS, channel_blocks))
    tiles_per_chunk = triton.cdiv(num_tiles, num_chunks)
    num_chunks = triton.cdiv(num_tiles, tiles_per_chunk)  # every chunk gets at least one tile
    mean_part = torch.empty((num_chunks, C), dtype=acc, device=x.device)
    m2_part = torch.empty_like(mean_part)

    if bn is None:
        y, weight, bias, running_mean, running_var, eps = x3, None, None, x3, x3, 0.0
    else:
        y, weight, bias, running_mean, running_var, eps = bn
        weight, bias, running_mean, running_var = (
            _dense_vector(t) for t in (weight, bias, running_mean, running_var))
    _stats_kernel[(num_chunks, channel_blocks)](
        x3, mean_part, m2_part,
        y, running_mean if weight is None else weight, running_mean if bias is None else bias,
        running_mean, running_var, eps,
        C, S, M, tiles_per_chunk,
        *x3.stride(), *y.stride(),
        APPLY_BN=bn is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=block_c, BLOCK_M=block_m, num_warps=8)

    mean = torch.empty(C, dtype=acc, device=x.device)
    var = torch.empty_like(mean)
    merge_block_c = min(128, triton.next_power_of_2(C))
    _merge_stats_kernel[(triton.cdiv(C, merge_block_c),)](
        mean_part, m2_part, mean, var, C, M, num_chunks, tiles_per_chunk * block_m,
        BLOCK_C=merge_block_c, BLOCK_K=_MERGE_BLOCK_K, num_warps=4)
    return mean, var


def _stats_backward(x, mean, grad_mean, grad_var, bn=None):
    """dx of channel_stats; with bn = (grad_y, weight, running_var, eps) plus the eval BatchNorm
    term."""
    N, C, S = _ncs_shape(x)
    M = N * S
    _check_channel_params(x, mean=mean, grad_mean=grad_mean, grad_var=grad_var)
    dx, dx3 = _ncs_output_like(x)
    if x.numel() == 0:
        return dx
    x3 = _ncs_input(x)
    acc = acc_dtype(x.dtype)
    mean, grad_mean, grad_var = (_dense_vector(t, acc) for t in (mean, grad_mean, grad_var))
    if bn is None:
        grad_y3, weight, running_var, eps = x3, None, mean, 0.0
    else:
        grad_y, weight, running_var, eps = bn
        grad_y3 = _ncs_input(grad_y)
        weight, running_var = _dense_vector(weight), _dense_vector(running_var)
    block_c, block_m = _tile_shape(C, M, x3.stride(1))
    _check_grid(C, M, block_c)
    _stats_backward_kernel[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        x3, grad_y3, dx3, mean, grad_mean, grad_var,
        mean if weight is None else weight, running_var, eps, C, S, M,
        *x3.stride(), *grad_y3.stride(), *dx3.stride(),
        HAS_GRAD_Y=bn is not None, HAS_WEIGHT=weight is not None,
        BLOCK_C=block_c, BLOCK_M=block_m, num_warps=8)
    return _finish_output(dx, dx3)


def _check_channel_params(x, **params):
    """Each given (not None) parameter is a float [C] vector on x's device."""
    for name, t in params.items():
        if t is not None:
            check_channel_vector(t, x.shape[1], name)
            check_float(t, name)
            check_device(x, **{name: t})


def channel_stats(x):
    _check_x(x)
    return _stats(x)


def channel_stats_backward(x, mean, grad_mean, grad_var):
    _check_x(x)
    return _stats_backward(x, mean, grad_mean, grad_var)


def bn_stats_forward(x, weight, bias, running_mean, running_var, eps):
    _check_x(x)
    _check_channel_params(x, weight=weight, bias=bias, running_mean=running_mean,
                          running_var=running_var)
    y, y3 = _ncs_output_like(x)
    mean, var = _stats(x, (y3, weight, bias, running_mean, running_var, eps))
    return _finish_output(y, y3), mean, var


def bn_stats_backward(grad_y, x, mean, grad_mean, grad_var, weight, running_var, eps):
    _check_x(x)
    check(grad_y.shape == x.shape, f"grad_y has shape {tuple(grad_y.shape)}, x {tuple(x.shape)}")
    check_float(grad_y, "grad_y")
    check_device(x, grad_y=grad_y)
    _check_channel_params(x, weight=weight, running_var=running_var)
    return _stats_backward(x, mean, grad_mean, grad_var, (grad_y, weight, running_var, eps))
