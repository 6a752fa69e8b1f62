"""dinv's fused ops. Each public op picks a backend per call (see `_backends`): the C++/CUDA
extension, the Triton kernels, or the pure-torch reference that every backend is tested against."""
from ._backends import BackendUnavailable, explain, forced, select, use_backend
from .bn_stat import (bn_inversion, bn_inversion_reference, bn_stat_loss, bn_stat_loss_reference,
                      channel_stats, channel_stats_reference, stat_divergence)
from .js import js_competition, js_competition_reference
from .kd import kd_loss, kd_loss_reference
from .image_prior import (ImagePrior, image_prior, image_prior_reference, tv_loss,
                          tv_loss_reference)

__all__ = [
    "BackendUnavailable", "explain", "forced", "select", "use_backend",
    "bn_inversion", "bn_inversion_reference", "bn_stat_loss", "bn_stat_loss_reference",
    "channel_stats", "channel_stats_reference", "stat_divergence",
    "js_competition", "js_competition_reference", "kd_loss", "kd_loss_reference",
    "ImagePrior", "image_prior", "image_prior_reference", "tv_loss", "tv_loss_reference",
]
