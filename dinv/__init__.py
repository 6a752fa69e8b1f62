"""dinv: fast DeepInversion and Adaptive DeepInversion (Yin et al., CVPR 2020).

    import dinv
    inv = dinv.Inverter(teacher, image_shape=(3, 224, 224))
    images = inv.invert(targets=[1, 2, 3], iterations=2000)
"""
from . import ops
from .info import backends
from .inverter import Inverter

__version__ = "0.1.0"
__all__ = ["Inverter", "backends", "ops"]
