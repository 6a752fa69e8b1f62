"""Knowledge-distillation loss: T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean."""
from __future__ import annotations

import torch.nn.functional as F

from . import _backends
from .js import _acc_logits, _check_logits


def kd_loss_reference(student_logits, teacher_logits, T: float = 4.0):
    s, t = _acc_logits(student_logits, teacher_logits)
    log_p = F.log_softmax(s / T, dim=1)
    log_q = F.log_softmax(t / T, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (T * T)


def kd_loss(student_logits, teacher_logits, T: float = 4.0):
    """Hinton's distillation loss. Gradients reach both logits when they require grad (detach
    the teacher's, as distillation does, to train the student alone)."""
    _check_logits(student_logits, teacher_logits)
    backend = _backends.select("kd_rows", student_logits, teacher_logits)
    if backend == "reference":
        return kd_loss_reference(student_logits, teacher_logits, T)
    rows = _backends.primitives(backend).kd_rows(student_logits, teacher_logits, float(T))
    return rows.mean() * (T * T)
