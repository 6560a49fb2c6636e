from .simmim import SimMIM, normalize_targets

__all__ = ["SimMIM", "normalize_targets"]
