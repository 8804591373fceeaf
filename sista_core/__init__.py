"""sista_core: the SISTA method (losses, encoders, model), importable without the pipeline.

Depends on torch, timm, transformers, entmax, safetensors, numpy and PIL only.
"""

from .config import SISTAConfig
from .encoders import ImageEncoder, TextEncoder, TokenizedText
from .losses import gather_with_grad, intra_loss, sia_loss, sta_loss
from .model import SISTAModel

__all__ = [
    "ImageEncoder",
    "SISTAConfig",
    "SISTAModel",
    "TextEncoder",
    "TokenizedText",
    "gather_with_grad",
    "intra_loss",
    "sia_loss",
    "sta_loss",
]
__version__ = "0.1.0"
