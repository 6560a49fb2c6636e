"""simmim-fast: SimMIM masked image modeling pretraining, exact and fast.

``SimMIM`` is imported lazily so that ``import simmim_fast.kernels`` (used on its own by other
MIM code) pulls in neither timm nor DeepSpeed nor DALI.
"""
from .config import Config, ConfigError, load_config
from .masking import BatchMaskGenerator, MaskGenerator

__version__ = "0.1.0"
__all__ = ["SimMIM", "MaskGenerator", "BatchMaskGenerator", "load_config", "Config", "ConfigError"]


def __getattr__(name):
    if name == "SimMIM":
        from .models import SimMIM
        return SimMIM
    raise AttributeError(f"module 'simmim_fast' has no attribute {name!r}")
