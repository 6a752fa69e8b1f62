"""Adaptive DeepInversion's competition term: 1 − Jensen-Shannon divergence between the student's
and the teacher's temperature softmaxes, with the reference code's clamping to [0.01, 0.99]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backends
from ._native import acc_dtype

CLAMP_LO, CLAMP_HI = 0.01, 0.99


def _check_logits(student_logits, teacher_logits):
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError("expected student and teacher logits of one shape [B, K], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[0] == 0:
        raise ValueError("empty batch")


def js_competition_reference(student_logits, teacher_logits, T: float = 3.0):
    """Exactly the reference code's formulation (KLDivLoss(batchmean) with M as the target), in
    the acc dtype (fp32, fp64 for fp64 logits)."""
    acc = acc_dtype(student_logits.dtype)
    s, t = student_logits.to(acc), teacher_logits.to(acc)
    p, q = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    m = 0.5 * (p + q)
    p, q, m = (torch.clamp(v, CLAMP_LO, CLAMP_HI) for v in (p, q, m))
    js = 0.5 * F.kl_div(torch.log(p), m, reduction="batchmean") + \
        0.5 * F.kl_div(torch.log(q), m, reduction="batchmean")
    return 1.0 - torch.clamp(js, 0.0, 1.0)


def js_competition(student_logits, teacher_logits, T: float = 3.0, detach_student: bool = False):
    """1 − clamp(JS(softmax(s/T) ‖ softmax(t/T)), 0, 1). `detach_student=True`: no gradient to
    the student's logits."""
    _check_logits(student_logits, teacher_logits)
    if detach_student:
        student_logits = student_logits.detach()
    backend = _backends.select(student_logits, teacher_logits)
    if backend == "reference":
        return js_competition_reference(student_logits, teacher_logits, T)
    rows = _backends.primitives(backend).js_rows(student_logits, teacher_logits, float(T))
    return 1.0 - torch.clamp(rows.mean(), 0.0, 1.0)
