"""Distillation KL rows: r_b = Σ_j q_j·(log q_j − log p_j) with q = softmax(t/T) and
log p = log_softmax(s/T). Terms whose q_j underflows to 0 count 0 (xlogy convention).

One program per row; the backward recomputes both softmaxes from the logits.
"""
import triton
import triton.language as tl

from ._softmax import (chunk, launch_rows, launch_rows_backward, log_softmax_chunk,
                       row_softmaxes, store_chunk)


@triton.jit
def _row_kl(s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
            ACC: tl.constexpr, BLOCK: tl.constexpr, WITH_KL: tl.constexpr):
    """(row, s_row, t_row, s_max, s_log_sum, t_max, t_log_sum, Σ_j q_j·(log q_j − log p_j)) of
    this program's row; the sum is 0, and its pass skipped, when not WITH_KL."""
    row, s_row, t_row, s_max, s_sum, t_max, t_sum = row_softmaxes(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k, ACC, BLOCK)
    s_log_sum = tl.log(s_sum)
    t_log_sum = tl.log(t_sum)
    total = tl.zeros([BLOCK], ACC)
    if WITH_KL:
        for k0 in range(0, K, BLOCK):
            cols, mask = chunk(k0, K, BLOCK)
            log_p = log_softmax_chunk(s_row, s_stride_k, cols, mask, T, s_max, s_log_sum, ACC)
            log_q = log_softmax_chunk(t_row, t_stride_k, cols, mask, T, t_max, t_log_sum, ACC)
            q = tl.exp(log_q)
            # q == 0 (underflow) counts 0, as xlogy does, and keeps 0·(−inf) out; a NaN q (bad
            # teacher logit) stays NaN, which `q > 0` would have zeroed.
            total += tl.where(mask, tl.where(q == 0, 0.0, q * (log_q - log_p)), 0.0)
    return row, s_row, t_row, s_max, s_log_sum, t_max, t_log_sum, tl.sum(total, 0)


@triton.jit
def _kd_rows_kernel(s_ptr, t_ptr, out_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                    BLOCK: tl.constexpr):
    row, s_row, t_row, s_max, s_log_sum, t_max, t_log_sum, kl = _row_kl(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
        out_ptr.dtype.element_ty, BLOCK, True)
    tl.store(out_ptr + row, kl)


@triton.jit
def _kd_rows_backward_kernel(grad_rows_ptr, s_ptr, t_ptr, ds_ptr, dt_ptr, K, T,
                             s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                             STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                             BLOCK: tl.constexpr):
    """ds_j = g/T·(p_j − q_j); dt_j = g/T·q_j·(a_j − Σ_k q_k·a_k) with a = log q − log p. Only the
    teacher's gradient needs the row's KL."""
    acc = grad_rows_ptr.dtype.element_ty
    row, s_row, t_row, s_max, s_log_sum, t_max, t_log_sum, qa = _row_kl(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k, acc, BLOCK,
        TEACHER_GRAD)

    g_over_t = tl.load(grad_rows_ptr + row).to(acc) / T
    for k0 in range(0, K, BLOCK):
        cols, mask = chunk(k0, K, BLOCK)
        log_p = log_softmax_chunk(s_row, s_stride_k, cols, mask, T, s_max, s_log_sum, acc)
        log_q = log_softmax_chunk(t_row, t_stride_k, cols, mask, T, t_max, t_log_sum, acc)
        q = tl.exp(log_q)
        if STUDENT_GRAD:
            store_chunk(ds_ptr, row, K, cols, mask, g_over_t * (tl.exp(log_p) - q))
        if TEACHER_GRAD:
            store_chunk(dt_ptr, row, K, cols, mask,
                        tl.where(q == 0, 0.0, g_over_t * q * (log_q - log_p - qa)))


def kd_rows(student_logits, teacher_logits, T):
    return launch_rows(_kd_rows_kernel, student_logits, teacher_logits, T)


def kd_rows_backward(grad_rows, student_logits, teacher_logits, T, student_grad, teacher_grad):
    return launch_rows_backward(_kd_rows_backward_kernel, grad_rows, student_logits,
                                teacher_logits, T, student_grad, teacher_grad)
