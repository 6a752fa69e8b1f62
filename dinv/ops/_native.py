"""Fake (meta) kernels and autograd for the primitive ops of a native namespace.

Both native backends expose the primitives of docs/kernels.md as torch ops: the C++ extension
as `torch.ops.dinv.*`, the Triton kernels as `torch.ops.dinv_triton.*`. Registering the shapes
(fake kernels) and the backward formulas once here, for either namespace, is what lets autograd
and torch.compile treat them like any aten op.
"""
from __future__ import annotations

import torch

# The per-row ops of the competition and distillation terms; each has a `<name>_backward`.
ROW_OPS = ("js_rows", "jsd_rows", "kd_rows")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every reduction: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_fake(x):
    c = x.shape[1]
    acc = acc_dtype(x.dtype)
    return x.new_empty(c, dtype=acc), x.new_empty(c, dtype=acc)


def logits_acc_dtype(student_logits, teacher_logits) -> torch.dtype:
    """The row ops' output dtype: every backend computes both rows in their promoted dtype, so an
    fp64 teacher makes fp64 rows even for an fp32 student."""
    return acc_dtype(torch.promote_types(student_logits.dtype, teacher_logits.dtype))


def _rows_fake(student_logits, teacher_logits, T):
    return student_logits.new_empty(student_logits.shape[0],
                                    dtype=logits_acc_dtype(student_logits, teacher_logits))


def _logit_grad_fake(logits, wanted):
    # Gradients are written contiguous in the logits' own dtype; one not asked for is empty.
    return logits.new_empty(logits.shape if wanted else (0,))


def _rows_backward_fake(grad_rows, student_logits, teacher_logits, T, student_grad, teacher_grad):
    return (_logit_grad_fake(student_logits, student_grad),
            _logit_grad_fake(teacher_logits, teacher_grad))


def _zeros_if_none(grad, like):
    return torch.zeros_like(like) if grad is None else grad.to(like.dtype)


def register(ns: str) -> None:
    ops = getattr(torch.ops, ns)
    lib = f"{ns}::"

    # -- channel statistics -------------------------------------------------------------------
    torch.library.register_fake(lib + "channel_stats")(_stats_fake)

    @torch.library.register_fake(lib + "channel_stats_backward")
    def _(x, mean, grad_mean, grad_var):
        return torch.empty_like(x)

    def stats_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[0])

    def stats_backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        dx = ops.channel_stats_backward(
            x, mean, _zeros_if_none(grad_mean, mean), _zeros_if_none(grad_var, mean))
        return dx

    torch.library.register_autograd(lib + "channel_stats", stats_backward,
                                    setup_context=stats_setup)

    # -- fused BatchNorm + statistics -----------------------------------------------------------
    @torch.library.register_fake(lib + "bn_stats_forward")
    def _(x, weight, bias, running_mean, running_var, eps):
        return (torch.empty_like(x),) + _stats_fake(x)

    @torch.library.register_fake(lib + "bn_stats_backward")
    def _(grad_y, x, mean, grad_mean, grad_var, weight, running_var, eps):
        return torch.empty_like(x)

    def bn_setup(ctx, inputs, output):
        x, weight, _, _, running_var, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x, output[1], weight, running_var)

    def bn_backward(ctx, grad_y, grad_mean, grad_var):
        x, mean, weight, running_var = ctx.saved_tensors
        dx = ops.bn_stats_backward(
            _zeros_if_none(grad_y, x), x, mean, _zeros_if_none(grad_mean, mean),
            _zeros_if_none(grad_var, mean), weight, running_var, ctx.eps)
        # The teacher's BN parameters and running statistics are frozen: no gradient.
        return dx, None, None, None, None, None

    torch.library.register_autograd(lib + "bn_stats_forward", bn_backward, setup_context=bn_setup)

    # -- image priors (total variation and L2) --------------------------------------------------
    @torch.library.register_fake(lib + "image_prior_sums")
    def _(x):
        acc = acc_dtype(x.dtype)
        return x.new_empty((2, 4), dtype=acc), x.new_empty(x.shape[0], dtype=acc)

    @torch.library.register_fake(lib + "image_prior_backward")
    def _(x, tv_coef, sq_coef):
        return torch.empty_like(x)

    def prior_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output[1])

    def prior_backward(ctx, grad_tv, grad_sq):
        x, sq = ctx.saved_tensors
        grad_tv = torch.zeros((2, 4), dtype=sq.dtype, device=sq.device) if grad_tv is None \
            else grad_tv.to(sq.dtype)
        # d(Σ|d|)/dd = sign(d), d(Σd²)/dd = 2d, d(Σx²)/dx = 2x: the kernel's coefficients carry
        # the factors 2.
        tv_coef = torch.cat([grad_tv[:1], 2 * grad_tv[1:]])
        return ops.image_prior_backward(x, tv_coef, 2 * _zeros_if_none(grad_sq, sq))

    torch.library.register_autograd(lib + "image_prior_sums", prior_backward,
                                    setup_context=prior_setup)

    # -- per-row JS competition (reference formula and true JS) and KD ----------------------------
    for rows in ROW_OPS:
        torch.library.register_fake(lib + rows)(_rows_fake)
        torch.library.register_fake(lib + rows + "_backward")(_rows_backward_fake)
        backward_op = getattr(ops, rows + "_backward")

        def rows_setup(ctx, inputs, output):
            ctx.T = inputs[2]
            ctx.save_for_backward(inputs[0], inputs[1])

        def rows_grad(ctx, grad_rows, backward_op=backward_op):
            student_logits, teacher_logits = ctx.saved_tensors
            # The kernels skip a gradient nobody needs: distillation detaches the teacher, ADI with
            # detach_student=True trains the teacher side only.
            student_grad, teacher_grad = ctx.needs_input_grad[:2]
            ds, dt = backward_op(grad_rows.contiguous(), student_logits, teacher_logits, ctx.T,
                                 student_grad, teacher_grad)
            return (ds if student_grad else None), (dt if teacher_grad else None), None

        torch.library.register_autograd(lib + rows, rows_grad, setup_context=rows_setup)
