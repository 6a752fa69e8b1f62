"""Jensen-Shannon competition rows of Adaptive DeepInversion, p = softmax(s/T), q = softmax(t/T),
m = (p+q)/2, in two formulas:

- js_rows, the reference code's clamped one: with pc, qc, mc = clamp(·, 0.01, 0.99),
      r_b = Σ_j mc_j·(log mc_j − ½ log pc_j − ½ log qc_j);
- jsd_rows, the true Jensen-Shannon divergence: with wp_j = p_j·log(p_j/m_j) and
  wq_j = q_j·log(q_j/m_j) (0 where the probability is 0),
      r_b = ½ Σ_j (wp_j + wq_j).

One program per row; the backward recomputes both softmaxes from the logits.
"""
import torch
import triton
import triton.language as tl

from ._softmax import (chunk, launch_rows, launch_rows_backward, logits_acc_dtype,
                       probs_and_logs_chunk, row_softmaxes, softmax_chunk, store_chunk)

CLAMP_LO = 0.01
CLAMP_HI = 0.99
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _clamp(v, LO: tl.constexpr, HI: tl.constexpr):
    # The bounds as tensors of v's dtype: a bare float constant is rounded to fp32 first, which
    # would move the fp64 bounds. NaN propagates, as in torch.clamp (the default min/max would
    # return the bound and hide a NaN row).
    low = tl.maximum(v, tl.full(v.shape, LO, v.dtype), propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(low, tl.full(v.shape, HI, v.dtype), propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _inside(v, LO: tl.constexpr, HI: tl.constexpr):
    """lo <= v <= hi: where torch.clamp passes the gradient."""
    return (v >= tl.full(v.shape, LO, v.dtype)) & (v <= tl.full(v.shape, HI, v.dtype))


@triton.jit
def _js_rows_kernel(s_ptr, t_ptr, out_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                    LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    acc = out_ptr.dtype.element_ty
    row, s_row, t_row, s_max, s_sum, t_max, t_sum = row_softmaxes(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k, acc, BLOCK)
    total = tl.zeros([BLOCK], acc)
    for k0 in range(0, K, BLOCK):
        cols, mask = chunk(k0, K, BLOCK)
        p = softmax_chunk(s_row, s_stride_k, cols, mask, T, s_max, s_sum, acc)
        q = softmax_chunk(t_row, t_stride_k, cols, mask, T, t_max, t_sum, acc)
        mc = _clamp(0.5 * (p + q), LO, HI)
        term = mc * (tl.log(mc) - 0.5 * tl.log(_clamp(p, LO, HI)) - 0.5 * tl.log(_clamp(q, LO, HI)))
        total += tl.where(mask, term, 0.0)
    tl.store(out_ptr + row, tl.sum(total, 0))


@triton.jit
def _js_local_grads(s_row, t_row, s_stride, t_stride, cols, mask, T,
                    s_max, s_sum, t_max, t_sum, LO: tl.constexpr, HI: tl.constexpr,
                    ACC: tl.constexpr):
    """(p, q, ∂r/∂p, ∂r/∂q) at `cols`."""
    p = softmax_chunk(s_row, s_stride, cols, mask, T, s_max, s_sum, ACC)
    q = softmax_chunk(t_row, t_stride, cols, mask, T, t_max, t_sum, ACC)
    m = 0.5 * (p + q)
    pc = _clamp(p, LO, HI)
    qc = _clamp(q, LO, HI)
    mc = _clamp(m, LO, HI)
    half_log_pc = 0.5 * tl.log(pc)
    half_log_qc = 0.5 * tl.log(qc)
    grad_m = tl.where(_inside(m, LO, HI), tl.log(mc) + 1.0 - half_log_pc - half_log_qc, 0.0)
    grad_p = tl.where(_inside(p, LO, HI), -0.5 * mc / pc, 0.0) + 0.5 * grad_m
    grad_q = tl.where(_inside(q, LO, HI), -0.5 * mc / qc, 0.0) + 0.5 * grad_m
    return p, q, grad_p, grad_q


@triton.jit
def _js_rows_backward_kernel(grad_rows_ptr, s_ptr, t_ptr, ds_ptr, dt_ptr, K, T,
                             s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                             STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                             LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    """Through the softmax: ds_j = g/T·p_j·(gp_j − Σ_k p_k·gp_k), likewise dt with q."""
    acc = grad_rows_ptr.dtype.element_ty
    row, s_row, t_row, s_max, s_sum, t_max, t_sum = row_softmaxes(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k, acc, BLOCK)
    p_dot_lanes = tl.zeros([BLOCK], acc)
    q_dot_lanes = tl.zeros([BLOCK], acc)
    for k0 in range(0, K, BLOCK):
        cols, mask = chunk(k0, K, BLOCK)
        p, q, grad_p, grad_q = _js_local_grads(s_row, t_row, s_stride_k, t_stride_k, cols, mask,
                                               T, s_max, s_sum, t_max, t_sum, LO, HI, acc)
        # Masked columns have p = q = 0, so they add nothing.
        if STUDENT_GRAD:
            p_dot_lanes += p * grad_p
        if TEACHER_GRAD:
            q_dot_lanes += q * grad_q
    p_dot = tl.sum(p_dot_lanes, 0)
    q_dot = tl.sum(q_dot_lanes, 0)

    g_over_t = tl.load(grad_rows_ptr + row).to(acc) / T
    for k0 in range(0, K, BLOCK):
        cols, mask = chunk(k0, K, BLOCK)
        p, q, grad_p, grad_q = _js_local_grads(s_row, t_row, s_stride_k, t_stride_k, cols, mask,
                                               T, s_max, s_sum, t_max, t_sum, LO, HI, acc)
        if STUDENT_GRAD:
            store_chunk(ds_ptr, row, K, cols, mask, g_over_t * p * (grad_p - p_dot))
        if TEACHER_GRAD:
            store_chunk(dt_ptr, row, K, cols, mask, g_over_t * q * (grad_q - q_dot))


def js_rows(student_logits, teacher_logits, T):
    return launch_rows(_js_rows_kernel, student_logits, teacher_logits, T,
                       LO=CLAMP_LO, HI=CLAMP_HI)


def js_rows_backward(grad_rows, student_logits, teacher_logits, T, student_grad, teacher_grad):
    return launch_rows_backward(_js_rows_backward_kernel, grad_rows, student_logits,
                                teacher_logits, T, student_grad, teacher_grad,
                                LO=CLAMP_LO, HI=CLAMP_HI)


@triton.jit
def _jsd_chunk(s_row, t_row, s_stride, t_stride, cols, mask, T, s_max, s_sum, s_log_sum, t_max,
               t_sum, t_log_sum, TINY: tl.constexpr, ACC: tl.constexpr):
    """(p, q, wp, wq) at `cols`, all 0 where masked. log m is taken of p + q floored at TINY,
    the smallest normal of ACC: no log of 0 or of a subnormal (flushed to 0 on some hardware),
    which arise only where both weights are (nearly) 0. The floor and the selects keep NaN."""
    p, log_p = probs_and_logs_chunk(s_row, s_stride, cols, mask, T, s_max, s_sum, s_log_sum, ACC)
    q, log_q = probs_and_logs_chunk(t_row, t_stride, cols, mask, T, t_max, t_sum, t_log_sum, ACC)
    total = tl.maximum(p + q, tl.full(p.shape, TINY, ACC), propagate_nan=tl.PropagateNan.ALL)
    log_m = tl.log(total) - tl.full(p.shape, _LN2, ACC)
    wp = tl.where(p == 0, 0.0, p * (log_p - log_m))
    wq = tl.where(q == 0, 0.0, q * (log_q - log_m))
    return p, q, wp, wq


@triton.jit
def _jsd_row(s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
             WITH_P: tl.constexpr, WITH_Q: tl.constexpr, TINY: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    """This program's row, its softmax normalizers and its KL sums Σ_j wp_j, Σ_j wq_j (0, and not
    accumulated, unless WITH_P / WITH_Q): (row, s_row, t_row, s_max, s_sum, s_log_sum, t_max,
    t_sum, t_log_sum, kl_p, kl_q)."""
    row, s_row, t_row, s_max, s_sum, t_max, t_sum = row_softmaxes(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k, ACC, BLOCK)
    s_log_sum = tl.log(s_sum)
    t_log_sum = tl.log(t_sum)
    wp_lanes = tl.zeros([BLOCK], ACC)
    wq_lanes = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK):
        cols, mask = chunk(k0, K, BLOCK)
        p, q, wp, wq = _jsd_chunk(s_row, t_row, s_stride_k, t_stride_k, cols, mask, T, s_max,
                                  s_sum, s_log_sum, t_max, t_sum, t_log_sum, TINY, ACC)
        if WITH_P:
            wp_lanes += wp
        if WITH_Q:
            wq_lanes += wq
    return (row, s_row, t_row, s_max, s_sum, s_log_sum, t_max, t_sum, t_log_sum,
            tl.sum(wp_lanes, 0), tl.sum(wq_lanes, 0))


@triton.jit
def _jsd_rows_kernel(s_ptr, t_ptr, out_ptr, K, T, s_stride_b, s_stride_k, t_stride_b,
                     t_stride_k, TINY: tl.constexpr, BLOCK: tl.constexpr):
    acc = out_ptr.dtype.element_ty
    row, s_row, t_row, s_max, s_sum, s_log_sum, t_max, t_sum, t_log_sum, kl_p, kl_q = _jsd_row(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k, True, True, TINY,
        acc, BLOCK)
    tl.store(out_ptr + row, 0.5 * (kl_p + kl_q))


@triton.jit
def _jsd_rows_backward_kernel(grad_rows_ptr, s_ptr, t_ptr, ds_ptr, dt_ptr, K, T,
                              s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                              STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                              TINY: tl.constexpr, BLOCK: tl.constexpr):
    """ds_j = g/(2T)·(wp_j − p_j·Σ_k wp_k), likewise dt with q and wq."""
    acc = grad_rows_ptr.dtype.element_ty
    row, s_row, t_row, s_max, s_sum, s_log_sum, t_max, t_sum, t_log_sum, kl_p, kl_q = _jsd_row(
        s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k, STUDENT_GRAD,
        TEACHER_GRAD, TINY, acc, BLOCK)
    half_g_over_t = 0.5 * tl.load(grad_rows_ptr + row).to(acc) / T
    for k0 in range(0, K, BLOCK):
        cols, mask = chunk(k0, K, BLOCK)
        p, q, wp, wq = _jsd_chunk(s_row, t_row, s_stride_k, t_stride_k, cols, mask, T, s_max,
                                  s_sum, s_log_sum, t_max, t_sum, t_log_sum, TINY, acc)
        if STUDENT_GRAD:
            store_chunk(ds_ptr, row, K, cols, mask, half_g_over_t * (wp - p * kl_p))
        if TEACHER_GRAD:
            store_chunk(dt_ptr, row, K, cols, mask, half_g_over_t * (wq - q * kl_q))


def _tiny(student_logits, teacher_logits):
    return torch.finfo(logits_acc_dtype(student_logits, teacher_logits)).tiny


def jsd_rows(student_logits, teacher_logits, T):
    return launch_rows(_jsd_rows_kernel, student_logits, teacher_logits, T,
                       TINY=_tiny(student_logits, teacher_logits))


def jsd_rows_backward(grad_rows, student_logits, teacher_logits, T, student_grad, teacher_grad):
    return launch_rows_backward(_jsd_rows_backward_kernel, grad_rows, student_logits,
                                teacher_logits, T, student_grad, teacher_grad,
                                TINY=_tiny(student_logits, teacher_logits))
