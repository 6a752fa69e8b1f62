"""Distillation KL rows: r_b = Σ_j q_j·(log q_j − log p_j) with q = softmax(t/T) and
log p = log_softmax(s/T). Terms whose q_j underflows to 0 count 0 (xlogy convention).

One program per row; the backward recomputes both softmaxes from the logits.
"""
import triton
import triton.language as tl

from ._softmax import launch_rows, launch_rows_backward, row_max_and_sum


@triton.jit
def _log_softmax_chunk(row_ptr, stride, cols, mask, T, row_max, log_row_sum, ACC: tl.constexpr):
    """log_softmax(logits/T) at `cols`, 0 where masked: benign values for the lanes the callers
    mask out (−inf would make NaNs of −inf − (−inf), other garbage could overflow exp)."""
    z = tl.load(row_ptr + cols * stride, mask=mask, other=0.0).to(ACC) / T
    return tl.where(mask, z - row_max - log_row_sum, 0.0)


@triton.jit
def _row_kl(s_row, t_row, s_stride, t_stride, K, T, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(s_max, s_log_sum, t_max, t_log_sum, Σ_j q_j·(log q_j − log p_j)) of one row."""
    s_max, s_sum = row_max_and_sum(s_row, s_stride, K, T, ACC, BLOCK)
    t_max, t_sum = row_max_and_sum(t_row, t_stride, K, T, ACC, BLOCK)
    s_log_sum = tl.log(s_sum)
    t_log_sum = tl.log(t_sum)
    total = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK):
        cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)  # cols * stride: int64 addresses
        mask = cols < K
        log_p = _log_softmax_chunk(s_row, s_stride, cols, mask, T, s_max, s_log_sum, ACC)
        log_q = _log_softmax_chunk(t_row, t_stride, cols, mask, T, t_max, t_log_sum, ACC)
        q = tl.exp(log_q)
        # q == 0 (underflow) counts 0, as xlogy does, and keeps 0·(−inf) out; a NaN q (bad
        # teacher logit) stays NaN, which `q > 0` would have zeroed.
        total += tl.where(mask, tl.where(q == 0, 0.0, q * (log_q - log_p)), 0.0)
    return s_max, s_log_sum, t_max, t_log_sum, tl.sum(total, 0)


@triton.jit
def _kd_rows_kernel(s_ptr, t_ptr, out_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                    BLOCK: tl.constexpr):
    acc = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    s_max, s_log_sum, t_max, t_log_sum, kl = _row_kl(s_row, t_row, s_stride_k, t_stride_k, K, T,
                                                     acc, BLOCK)
    tl.store(out_ptr + row, kl)


@triton.jit
def _kd_rows_backward_kernel(grad_rows_ptr, s_ptr, t_ptr, ds_ptr, dt_ptr, K, T,
                             s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                             ds_stride_b, ds_stride_k, dt_stride_b, dt_stride_k,
                             BLOCK: tl.constexpr):
    """ds_j = g/T·(p_j − q_j); dt_j = g/T·q_j·(a_j − Σ_k q_k·a_k) with a = log q − log p."""
    acc = grad_rows_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    s_max, s_log_sum, t_max, t_log_sum, qa = _row_kl(s_row, t_row, s_stride_k, t_stride_k, K, T,
                                                     acc, BLOCK)

    g_over_t = tl.load(grad_rows_ptr + row).to(acc) / T
    for k0 in range(0, K, BLOCK):
        cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        mask = cols < K
        log_p = _log_softmax_chunk(s_row, s_stride_k, cols, mask, T, s_max, s_log_sum, acc)
        log_q = _log_softmax_chunk(t_row, t_stride_k, cols, mask, T, t_max, t_log_sum, acc)
        q = tl.exp(log_q)
        ds = g_over_t * (tl.exp(log_p) - q)
        dt = tl.where(q == 0, 0.0, g_over_t * q * (log_q - log_p - qa))
        tl.store(ds_ptr + row * ds_stride_b + cols * ds_stride_k,
                 ds.to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(dt_ptr + row * dt_stride_b + cols * dt_stride_k,
                 dt.to(dt_ptr.dtype.element_ty), mask=mask)


def kd_rows(student_logits, teacher_logits, T):
    return launch_rows(_kd_rows_kernel, student_logits, teacher_logits, T)


def kd_rows_backward(grad_rows, student_logits, teacher_logits, T):
    return launch_rows_backward(_kd_rows_backward_kernel, grad_rows, student_logits,
                                teacher_logits, T)
