"""Pieces shared by the per-row softmax kernels (js, kd): one program per row of [B, K] logits,
K walked in BLOCK-sized chunks so rows of any length fit.

A row kernel has the signature (s, t, out, K, T, strides of s and t, ..., BLOCK) forward and
(grad_rows, s, t, ds, dt, K, T, strides of s and t, STUDENT_GRAD, TEACHER_GRAD, ..., BLOCK)
backward: ds and dt are contiguous [B, K] outputs, written only where their flag is set (an
empty tensor stands in for one not asked for)."""
import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check, check_device, check_float


@triton.jit
def row_max_and_sum(row_ptr, stride, K, T, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(max_j z_j, Σ_j exp(z_j − max)) of z = logits/T, in ACC: one pass for the max, one for the
    sum of the shifted exponentials (a stable softmax)."""
    max_lanes = tl.full([BLOCK], float("-inf"), ACC)
    for k0 in range(0, K, BLOCK):
        cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)  # cols * stride: int64 addresses
        z = tl.load(row_ptr + cols * stride, mask=cols < K, other=float("-inf")).to(ACC) / T
        max_lanes = tl.maximum(max_lanes, z)
    row_max = tl.max(max_lanes, 0)
    sum_lanes = tl.zeros([BLOCK], ACC)
    for k0 in range(0, K, BLOCK):
        cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
        z = tl.load(row_ptr + cols * stride, mask=cols < K, other=float("-inf")).to(ACC) / T
        sum_lanes += tl.exp(z - row_max)
    return row_max, tl.sum(sum_lanes, 0)


@triton.jit
def row_softmaxes(s_ptr, t_ptr, K, T, s_stride_b, s_stride_k, t_stride_b, t_stride_k,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's row and the softmax normalizers of its student and teacher logits:
    (row, s_row, t_row, s_max, s_sum, t_max, t_sum)."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride_b
    t_row = t_ptr + row * t_stride_b
    s_max, s_sum = row_max_and_sum(s_row, s_stride_k, K, T, ACC, BLOCK)
    t_max, t_sum = row_max_and_sum(t_row, t_stride_k, K, T, ACC, BLOCK)
    return row, s_row, t_row, s_max, s_sum, t_max, t_sum


@triton.jit
def chunk(k0, K, BLOCK: tl.constexpr):
    """The columns k0 .. k0+BLOCK (int64: cols * stride are addresses) and which exist."""
    cols = (k0 + tl.arange(0, BLOCK)).to(tl.int64)
    return cols, cols < K


@triton.jit
def softmax_chunk(row_ptr, stride, cols, mask, T, row_max, row_sum, ACC: tl.constexpr):
    """softmax(logits/T) at `cols` (0 where masked)."""
    z = tl.load(row_ptr + cols * stride, mask=mask, other=float("-inf")).to(ACC) / T
    return tl.exp(z - row_max) / row_sum


@triton.jit
def log_softmax_chunk(row_ptr, stride, cols, mask, T, row_max, log_row_sum, ACC: tl.constexpr):
    """log_softmax(logits/T) at `cols`, 0 where masked: benign values for the lanes the callers
    mask out (−inf would make NaNs of −inf − (−inf), other garbage could overflow exp)."""
    z = tl.load(row_ptr + cols * stride, mask=mask, other=0.0).to(ACC) / T
    return tl.where(mask, z - row_max - log_row_sum, 0.0)


@triton.jit
def probs_and_logs_chunk(row_ptr, stride, cols, mask, T, row_max, row_sum, log_row_sum,
                         ACC: tl.constexpr):
    """(softmax, log_softmax) of logits/T at `cols`, from one load: both 0 where masked. The
    probability is exp(z − max)/sum, rounded once more than its log, as the C++ and CUDA kernels
    compute it."""
    z = tl.load(row_ptr + cols * stride, mask=mask, other=0.0).to(ACC) / T
    shifted = z - row_max
    return (tl.where(mask, tl.exp(shifted) / row_sum, 0.0),
            tl.where(mask, shifted - log_row_sum, 0.0))


@triton.jit
def store_chunk(ptr, row, K, cols, mask, value):
    """Stores `value` at `cols` of row `row` of a contiguous [B, K] output, rounded once."""
    tl.store(ptr + row * K + cols, value.to(ptr.dtype.element_ty), mask=mask)


def check_logits(student_logits, teacher_logits):
    check(student_logits.dim() == 2 and student_logits.shape == teacher_logits.shape,
          "expected student and teacher logits of one shape [B, K], got "
          f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    check_float(student_logits, "student_logits")
    check_float(teacher_logits, "teacher_logits")
    check_device(student_logits, teacher_logits=teacher_logits)


def check_grad_rows(grad_rows, student_logits):
    check(grad_rows.shape == student_logits.shape[:1],
          f"grad_rows must have shape ({student_logits.shape[0]},), got {tuple(grad_rows.shape)}")
    check_float(grad_rows, "grad_rows")
    check_device(student_logits, grad_rows=grad_rows)


def logits_acc_dtype(student_logits, teacher_logits):
    """Both rows are computed in the acc dtype of their promoted dtype, as the C++ kernels do."""
    return acc_dtype(torch.promote_types(student_logits.dtype, teacher_logits.dtype))


def row_block(K):
    """Chunk length: the whole row up to 1024 columns."""
    return max(16, min(1024, triton.next_power_of_2(K)))


def launch_rows(kernel, student_logits, teacher_logits, T, **constexprs):
    """out[b] of a per-row forward kernel: one program per row, out in the acc dtype."""
    check_logits(student_logits, teacher_logits)
    B, K = student_logits.shape
    rows = torch.empty(B, dtype=logits_acc_dtype(student_logits, teacher_logits),
                       device=student_logits.device)
    if B == 0:
        return rows
    kernel[(B,)](student_logits, teacher_logits, rows, K, float(T),
                 *student_logits.stride(), *teacher_logits.stride(),
                 BLOCK=row_block(K), num_warps=4, **constexprs)
    return rows


def _logit_grad(logits, wanted):
    return torch.empty(logits.shape if wanted else (0,), dtype=logits.dtype,
                       device=logits.device)


def launch_rows_backward(kernel, grad_rows, student_logits, teacher_logits, T, student_grad,
                         teacher_grad, **constexprs):
    """(ds, dt) of a per-row backward kernel; a gradient not asked for is an empty tensor."""
    check_logits(student_logits, teacher_logits)
    check_grad_rows(grad_rows, student_logits)
    B, K = student_logits.shape
    grad_student = _logit_grad(student_logits, student_grad)
    grad_teacher = _logit_grad(teacher_logits, teacher_grad)
    if B == 0 or K == 0 or not (student_grad or teacher_grad):
        return grad_student, grad_teacher
    # The kernels read grad_rows as a contiguous vector in the acc dtype (a no-op for the [B] acc
    # tensor the contract promises).
    grad_rows = grad_rows.to(logits_acc_dtype(student_logits, teacher_logits)).contiguous()
    kernel[(B,)](grad_rows, student_logits, teacher_logits, grad_student, grad_teacher, K,
                 float(T), *student_logits.stride(), *teacher_logits.stride(),
                 STUDENT_GRAD=bool(student_grad), TEACHER_GRAD=bool(teacher_grad),
                 BLOCK=row_block(K), num_warps=4, **constexprs)
    return grad_student, grad_teacher
