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

    def __call__(self, x, logits, layer_losses, targets, student_logits=None, batch=None):
        """(loss, per-image cost, detached terms) of images `x` whose teacher logits are
        `logits` and per-BN-layer statistic losses `layer_losses` [L]. The per-image cost (its
        own weighted cross-entropy plus the batch's regularizers) ranks images for keeping the
        best ones.

        batch: a `dinv.distributed.GlobalBatch` when `x` is this process's share of a batch
        spread over ranks: every term is then the whole batch's (`layer_losses` must be of the
        merged statistics), the same on every rank."""
        c = self.coefficients
        logits = logits.to(self.dtype)
        if batch is None:
            main = self.criterion(logits, targets)
            prior = ops.image_prior(x)  # TV l1/l2 and L2 from one pass over x (fp32 sums)
            divergence = None
        else:
            main, prior, divergence = self._global_terms(x, logits, targets, student_logits,
                                                         batch)
        weights = torch.ones_like(layer_losses)
        weights[0] = c.first_bn_multiplier
        r_feature = (layer_losses * weights).sum()
        aux = c.r_feature * r_feature + c.l2 * prior.l2
        terms = {"main": main, "r_feature": r_feature}
        if c.tv_l2:
            aux = aux + c.tv_l2 * prior.tv_l2
            terms["tv_l2"] = prior.tv_l2
        if c.tv_l1:
            aux = aux + c.tv_l1 * prior.tv_l1
            terms["tv_l1"] = prior.tv_l1
        if c.adi_scale:
            competition = self._competition(student_logits, logits) if divergence is None \
                else ops.competition_loss(divergence, self.competition)
            aux = aux + c.adi_scale * competition
            terms["competition"] = competition
        loss = c.main_loss_multiplier * main + aux
        terms["loss"] = loss
        with torch.no_grad():
            per_image = c.main_loss_multiplier * F.cross_entropy(logits, targets,
                                                                 reduction="none") + aux.detach()
        return loss, per_image, {k: v.detach() for k, v in terms.items()}

    def _competition(self, student_logits, logits):
        return ops.js_competition(student_logits.to(self.dtype), logits, T=self.temperature,
                                  detach_student=self.detach_student, formula=self.competition)

    def _global_terms(self, x, logits, targets, student_logits, batch):
        """(main loss, ImagePrior, competition's batch-mean divergence or None) of the whole
        batch from this rank's share: every rank's partial sums (the criterion's share-weighted
        mean, the priors' sums before their divisions and square roots, the divergence's
        share-weighted mean before the reference formula's clamp) in one reduction. The
        criterion must be a mean over the images, as the default cross-entropy is."""
        c = self.coefficients
        tv, image_squares = ops.image_prior_sums(x)
        partial = [(batch.share * self.criterion(logits, targets)).reshape(1),
                   tv.reshape(-1).to(self.dtype),
                   ops.image_norms(image_squares).sum().reshape(1).to(self.dtype)]
        if c.adi_scale:
            divergence = ops.js_divergence(student_logits.to(self.dtype), logits,
                                           T=self.temperature,
                                           detach_student=self.detach_student,
                                           formula=self.competition)
            partial.append((batch.share * divergence).reshape(1))
        # [criterion, Σ|d_k| (4), Σd_k² (4), Σ_n ‖x_n‖, divergence (ADI)] of the whole batch
        total = batch.sum(torch.cat(partial))
        counts = [count // batch.count * batch.total for count in ops.difference_counts(x)]
        prior = ops.prior_from_sums(total[1:9].view(2, 4), total[9], counts, batch.total)
        return total[0], prior, total[10] if c.adi_scale else None
