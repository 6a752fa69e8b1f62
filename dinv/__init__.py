"""dinv: fast DeepInversion and Adaptive DeepInversion (Yin et al., CVPR 2020), and the
data-free applications built on it (distillation, pruning, continual learning).

    import dinv
    inv = dinv.Inverter(teacher, image_shape=(3, 224, 224))
    images = inv.invert(targets=[1, 2, 3], iterations=2000)
"""
from . import ops
from ._version import __version__
from .info import backends
from .inverter import InversionDiverged, Inverter

__all__ = ["InversionDiverged", "Inverter", "__version__", "backends", "ops"]
