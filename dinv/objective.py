"""The DeepInversion objective of one batch, from the teacher's logits and BatchNorm-statistic
losses on it: every synthesizer (pixel `Inverter`, generator `FastInverter`) minimizes this.

    loss = main_loss_multiplier · criterion(logits, targets)
         + r_feature · Σ_l w_l · (‖rv_l − var_l‖₂ + ‖rm_l − mean_l‖₂)   (w_0 = first_bn_multiplier)
         + tv_l1 · TV_l1(x) + tv_l2 · TV_l2(x) + l2 · mean_n ‖x_n‖
         + adi_scale · competition(student_logits, logits)              (ADI)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops


class Objective:
    """The weighted sum above. `coefficients` has the reference's names (r_feature,
    first_bn_multiplier, tv_l1, tv_l2, l2, main_loss_multiplier, adi_scale); `competition` is
    "js" or "reference" (see `dinv.ops.js_competition`); losses are computed in `dtype` (fp32, or
    fp64 for a fp64 teacher)."""

    def __init__(self, coefficients, criterion, competition: str, temperature: float,
                 detach_student: bool, dtype: torch.dtype = torch.float32):
        self.coefficients = coefficients
        self.criterion = criterion
        self.competition = competition
        self.temperature = temperature
        self.detach_student = detach_student
        self.dtype = dtype

    def __call__(self, x, logits, layer_losses, targets, student_logits=None):
        """(loss, per-image cost, detached terms) of images `x` whose teacher logits are
        `logits` and per-BN-layer statistic losses `layer_losses` [L]. The per-image cost (its
        own weighted cross-entropy plus the batch's regularizers) ranks images for keeping the
        best ones."""
        c = self.coefficients
        logits = logits.to(self.dtype)
        main = self.criterion(logits, targets)
        weights = torch.ones_like(layer_losses)
        weights[0] = c.first_bn_multiplier
        r_feature = (layer_losses * weights).sum()
        prior = ops.image_prior(x)  # TV l1/l2 and L2 from one pass over x (fp32 sums)
        aux = c.r_feature * r_feature + c.l2 * prior.l2
        terms = {"main": main, "r_feature": r_feature}
        if c.tv_l2:
            aux = aux + c.tv_l2 * prior.tv_l2
            terms["tv_l2"] = prior.tv_l2
        if c.tv_l1:
            aux = aux + c.tv_l1 * prior.tv_l1
            terms["tv_l1"] = prior.tv_l1
        if c.adi_scale:
            competition = ops.js_competition(student_logits.to(self.dtype), logits,
                                             T=self.temperature,
                                             detach_student=self.detach_student,
                                             formula=self.competition)
            aux = aux + c.adi_scale * competition
            terms["competition"] = competition
        loss = c.main_loss_multiplier * main + aux
        terms["loss"] = loss
        with torch.no_grad():
            per_image = c.main_loss_multiplier * F.cross_entropy(logits, targets,
                                                                 reduction="none") + aux.detach()
        return loss, per_image, {k: v.detach() for k, v in terms.items()}
