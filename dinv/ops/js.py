"""Adaptive DeepInversion's competition term: 1 − a Jensen-Shannon divergence between the
student's and the teacher's temperature softmaxes P = softmax(s/T), Q = softmax(t/T), with
M = (P+Q)/2. Two formulas:

- "reference" (the default): the NVlabs code's ½·KL(M‖P) + ½·KL(M‖Q) on P, Q, M clamped to
  [0.01, 0.99], loss 1 − clamp(JS, 0, 1). It is not the Jensen-Shannon divergence, and the clamps
  zero its gradient wherever all probabilities lie below 0.01 (near-uniform rows of > 100 classes).
- "js": the true divergence ½·KL(P‖M) + ½·KL(Q‖M) per row (0 ≤ JS ≤ ln 2), loss 1 − JS, no
  clamping: it has a gradient wherever P ≠ Q.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _backends
from ._native import logits_acc_dtype

CLAMP_LO, CLAMP_HI = 0.01, 0.99
FORMULAS = ("reference", "js")
_ROWS_OP = {"reference": "js_rows", "js": "jsd_rows"}


def _check_logits(student_logits, teacher_logits):
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError("expected student and teacher logits of one shape [B, K], got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[0] == 0:
        raise ValueError("empty batch")


def _check_formula(formula):
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {', '.join(map(repr, FORMULAS))}, "
                         f"got {formula!r}")


def _loss(js, formula):
    """The competition loss from the batch-mean divergence."""
    return 1.0 - (torch.clamp(js, 0.0, 1.0) if formula == "reference" else js)


def _acc_logits(student_logits, teacher_logits):
    # Both in their promoted acc dtype, as the kernels compute (an fp64 teacher makes fp64 rows).
    acc = logits_acc_dtype(student_logits, teacher_logits)
    return student_logits.to(acc), teacher_logits.to(acc)


def _clamped_js_reference(student_logits, teacher_logits, T):
    """Exactly the reference code's formulation (KLDivLoss(batchmean) with M as the target)."""
    s, t = _acc_logits(student_logits, teacher_logits)
    p, q = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
    m = 0.5 * (p + q)
    p, q, m = (torch.clamp(v, CLAMP_LO, CLAMP_HI) for v in (p, q, m))
    return 0.5 * F.kl_div(torch.log(p), m, reduction="batchmean") + \
        0.5 * F.kl_div(torch.log(q), m, reduction="batchmean")


def js_divergence_rows_reference(student_logits, teacher_logits, T: float = 3.0):
    """JS(P‖Q) of each row [B], in the acc dtype. log M comes from the exact log-probabilities
    (logaddexp), and a probability that underflows to 0 contributes 0 (xlogy convention): nothing
    is NaN for finite logits, value or gradient, while a NaN/inf logit still makes its row NaN."""
    s, t = _acc_logits(student_logits, teacher_logits)
    log_p, log_q = F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)

    def kl_to_m(log_x):
        x = log_x.exp()
        return torch.where(x == 0, 0.0, x * (log_x - log_m)).sum(1)

    return 0.5 * (kl_to_m(log_p) + kl_to_m(log_q))


def js_competition_reference(student_logits, teacher_logits, T: float = 3.0,
                             formula: str = "reference"):
    """The pure-torch competition loss of either formula, in the acc dtype (fp32, fp64 for fp64
    logits)."""
    _check_formula(formula)
    if formula == "reference":
        js = _clamped_js_reference(student_logits, teacher_logits, T)
    else:
        js = js_divergence_rows_reference(student_logits, teacher_logits, T).mean()
    return _loss(js, formula)


def js_divergence(student_logits, teacher_logits, T: float = 3.0, detach_student: bool = False,
                  formula: str = "reference"):
    """The batch-mean divergence of `formula` before the competition loss is formed from it (the
    reference formula's clamp acts on the mean: a batch spread over processes averages first)."""
    _check_logits(student_logits, teacher_logits)
    _check_formula(formula)
    if detach_student:
        student_logits = student_logits.detach()
    op = _ROWS_OP[formula]
    backend = _backends.select(op, student_logits, teacher_logits)
    if backend == "reference":
        if formula == "reference":
            return _clamped_js_reference(student_logits, teacher_logits, T)
        return js_divergence_rows_reference(student_logits, teacher_logits, T).mean()
    return getattr(_backends.primitives(backend), op)(student_logits, teacher_logits,
                                                      float(T)).mean()


def competition_loss(divergence: torch.Tensor, formula: str = "reference") -> torch.Tensor:
    """The competition loss from a batch-mean divergence: 1 − clamp(JS, 0, 1) ("reference") or
    1 − JS ("js")."""
    _check_formula(formula)
    return _loss(divergence, formula)


def js_competition(student_logits, teacher_logits, T: float = 3.0, detach_student: bool = False,
                   formula: str = "reference"):
    """1 − JS(softmax(s/T) ‖ softmax(t/T)) in formula "reference" (clamped, the NVlabs code's) or
    "js" (the true divergence). `detach_student=True`: no gradient to the student's logits."""
    return _loss(js_divergence(student_logits, teacher_logits, T, detach_student, formula),
                 formula)
