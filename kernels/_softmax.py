"""Pieces shared by the per-row softmax kernels (js, kd): one program per row of [B, K] logits,
K walked in BLOCK-sized chunks so rows of any length fit."""
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
    return acc_dtype(torch.promote_types(student_logits.dtype, teacher_logits.dtype))


def row_block(K):
    """Chunk length: the whole row up to 1024 columns."""
    return max(16, min(1024, triton.next_power_of_2(K)))


def launch_rows(kernel, student_logits, teacher_logits, T, **constexprs):
    """out[b] of a per-row forward kernel with the signature (s, t, out, K, T, strides of s and
    t, ..., BLOCK): one program per row, out in the acc dtype."""
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


def launch_rows_backward(kernel, grad_rows, student_logits, teacher_logits, T, **constexprs):
    """(ds, dt) of a per-row backward kernel with the signature (grad_rows, s, t, ds, dt, K, T,
    strides of s, t, ds and dt, ..., BLOCK)."""
    check_logits(student_logits, teacher_logits)
    check_grad_rows(grad_rows, student_logits)
    B, K = student_logits.shape
    grad_student = torch.empty_like(student_logits)
    grad_teacher = torch.empty_like(teacher_logits)
    if B == 0 or K == 0:
        return grad_student, grad_teacher
    # The kernels read grad_rows as a contiguous vector in the acc dtype (a no-op for the [B] acc
    # tensor the contract promises).
    grad_rows = grad_rows.to(logits_acc_dtype(student_logits, teacher_logits)).contiguous()
    kernel[(B,)](grad_rows, student_logits, teacher_logits, grad_student, grad_teacher, K,
                 float(T), *student_logits.stride(), *teacher_logits.stride(),
                 *grad_student.stride(), *grad_teacher.stride(),
                 BLOCK=row_block(K), num_warps=4, **constexprs)
    return grad_student, grad_teacher
