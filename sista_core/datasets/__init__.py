"""Dataset adapters: one small class per source format, all yielding ``Sample``."""

from .base import DatasetAdapter, RecordError, RecordRef, Sample

__all__ = ["DatasetAdapter", "RecordError", "RecordRef", "Sample"]
