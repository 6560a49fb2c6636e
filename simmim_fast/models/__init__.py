from .simmim import SimMIM, denormalize_targets, local_stats, normalize_targets

__all__ = ["SimMIM", "normalize_targets", "denormalize_targets", "local_stats"]
