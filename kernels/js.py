"""Jensen-Shannon competition rows of Adaptive DeepInversion, with the reference code's clamping:

    p = softmax(s/T)   q = softmax(t/T)   m = (p+q)/2   pc, qc, mc = clamp(·, 0.01, 0.99)
    r_b = Σ_j mc_j·(log mc_j − ½ log pc_j − ½ log qc_j)

One program per row; the backward recomputes both softmaxes from the logits.
"""
import triton
import triton.language as tl

from ._softmax import launch_rows, launch_rows_backward, row_max_and_sum

CLAMP_LO = 0.01
CLAMP_HI = 0.99


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
def _softmax_chunk(row_ptr, stride, cols, mask, T, row_max, row_sum, ACC: tl.constexpr):
    """softmax(logits/T) at `cols` (0 where masked)."""
    z = tl.load(row_ptr + cols * stride, mask=mask, other=float("-inf")).to(ACC) / T
    return tl.exp(z - row_max) / row_sum


@triton.jit
def _js_rows_kernel(s_ptr, t_ptr, out_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                    LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    acc = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    s_max, s_sum = row_max_and_sum(s_row, s_stride_k, K, T, acc, BLOCK)
    t_max, t_sum = row_max_and_sum(t_row, t_stride_k, K, T, acc, BLOCK)

    total = tl.zeros([BLOCK], acc)
    for k0 in range(0, K, BLOCK):
        cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)  # cols * stride: int64 addresses
        mask = cols < K
        p = _softmax_chunk(s_row, s_stride_k, cols, mask, T, s_max, s_sum, acc)
        q = _softmax_chunk(t_row, t_stride_k, cols, mask, T, t_max, t_sum, acc)
        mc = _clamp(0.5 * (p + q), LO, HI)
        term = mc * (tl.log(mc) - 0.5 * tl.log(_clamp(p, LO, HI)) - 0.5 * tl.log(_clamp(q, LO, HI)))
        total += tl.where(mask, term, 0.0)
    tl.store(out_ptr + row, tl.sum(total, 0))


@triton.jit
def _js_local_grads(s_row, t_row, s_stride, t_stride, cols, mask, T,
                    s_max, s_sum, t_max, t_sum, LO: tl.constexpr, HI: tl.constexpr,
                    ACC: tl.constexpr):
    """(p, q, ∂r/∂p, ∂r/∂q) at `cols`."""
    p = _softmax_chunk(s_row, s_stride, cols, mask, T, s_max, s_sum, ACC)
    q = _softmax_chunk(t_row, t_stride, cols, mask, T, t_max, t_sum, ACC)
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
                             ds_stride_b, ds_stride_k, dt_stride_b, dt_stride_k,
                             LO: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr):
    """Through the softmax: ds_j = g/T·p_j·(gp_j − Σ_k p_k·gp_k), likewise dt with q."""
    acc = grad_rows_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    s_max, s_sum = row_max_and_sum(s_row, s_stride_k, K, T, acc, BLOCK)
    t_max, t_sum = row_max_and_sum(t_row, t_stride_k, K, T, acc, BLOCK)

    p_dot_lanes = tl.zeros([BLOCK], acc)
    q_dot_lanes = tl.zeros([BLOCK], acc)
    for k0 in range(0, K, BLOCK):
        cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        mask = cols < K
        p, q, grad_p, grad_q = _js_local_grads(s_row, t_row, s_stride_k, t_stride_k, cols, mask,
                                               T, s_max, s_sum, t_max, t_sum, LO, HI, acc)
        # Masked columns have p = q = 0, so they add nothing.
        p_dot_lanes += p * grad_p
        q_dot_lanes += q * grad_q
    p_dot = tl.sum(p_dot_lanes, 0)
    q_dot = tl.sum(q_dot_lanes, 0)

    g_over_t = tl.load(grad_rows_ptr + row).to(acc) / T
    for k0 in range(0, K, BLOCK):
        cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        mask = cols < K
        p, q, grad_p, grad_q = _js_local_grads(s_row, t_row, s_stride_k, t_stride_k, cols, mask,
                                               T, s_max, s_sum, t_max, t_sum, LO, HI, acc)
        ds = g_over_t * p * (grad_p - p_dot)
        dt = g_over_t * q * (grad_q - q_dot)
        tl.store(ds_ptr + row * ds_stride_b + cols * ds_stride_k,
                 ds.to(ds_ptr.dtype.element_ty), mask=mask)
        tl.store(dt_ptr + row * dt_stride_b + cols * dt_stride_k,
                 dt.to(dt_ptr.dtype.element_ty), mask=mask)


def js_rows(student_logits, teacher_logits, T):
    return launch_rows(_js_rows_kernel, student_logits, teacher_logits, T,
                       LO=CLAMP_LO, HI=CLAMP_HI)


def js_rows_backward(grad_rows, student_logits, teacher_logits, T):
    return launch_rows_backward(_js_rows_backward_kernel, grad_rows, student_logits,
                                teacher_logits, T, LO=CLAMP_LO, HI=CLAMP_HI)
