"""Encoders with stable contracts: images -> global + patches; texts -> global + words."""

from .image import ImageEncoder, ImageEncoderConfig
from .text import TextEncoder, TokenizedText, default_text_encoder_path, is_masked_word

__all__ = [
    "ImageEncoder",
    "ImageEncoderConfig",
    "TextEncoder",
    "TokenizedText",
    "default_text_encoder_path",
    "is_masked_word",
]
