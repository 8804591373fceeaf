"""sista_core: the SISTA method (losses, encoders, model), importable without the pipeline.

Depends on torch, timm, transformers, entmax, safetensors, numpy and PIL only. The names
below load lazily, so that ``import sista_core.datasets`` does not pay for timm and
transformers.
"""

from importlib import import_module

_EXPORTS = {
    "SISTAConfig": "config",
    "ImageEncoder": "encoders",
    "TextEncoder": "encoders",
    "TokenizedText": "encoders",
    "SISTAModel": "model",
    "gather_with_grad": "losses",
    "intra_loss": "losses",
    "sia_loss": "losses",
    "sta_loss": "losses",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sista_core' has no attribute {name!r}")
