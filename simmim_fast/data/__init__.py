"""Data pipelines for SimMIM pretraining (see loader.py for the interface the engine consumes)."""
from .files import list_images
from .loader import PretrainLoader, epoch_order, load_index

__all__ = ["PretrainLoader", "epoch_order", "list_images", "load_index"]
