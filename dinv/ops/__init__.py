"""dinv's fused ops. Each public op picks a backend per call (see `_backends`): the C++/CUDA
extension, the Triton kernels, or the pure-torch reference that every backend is tested against."""
from ._backends import BackendUnavailable, explain, forced, select, use_backend
from .bn_stat import (bn_inversion, bn_inversion_reference, bn_stat_loss, bn_stat_loss_reference,
                      channel_stats, channel_stats_reference, stat_divergence)
from .js import competition_loss, js_competition, js_competition_reference, js_divergence
from .kd import kd_loss, kd_loss_reference
from .image_prior import (ImagePrior, difference_counts, image_norms, image_prior,
                          image_prior_reference, image_prior_sums, image_prior_sums_reference,
                          prior_from_sums, tv_loss, tv_loss_reference)

__all__ = [
    "BackendUnavailable", "explain", "forced", "select", "use_backend",
    "bn_inversion", "bn_inversion_reference", "bn_stat_loss", "bn_stat_loss_reference",
    "channel_stats", "channel_stats_reference", "stat_divergence",
    "competition_loss", "js_competition", "js_competition_reference", "js_divergence",
    "kd_loss", "kd_loss_reference",
    "ImagePrior", "difference_counts", "image_norms", "image_prior", "image_prior_reference",
    "image_prior_sums", "image_prior_sums_reference", "prior_from_sums", "tv_loss",
    "tv_loss_reference",
]
