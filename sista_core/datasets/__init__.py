"""Dataset adapters: one small class per source format, all yielding ``Sample``."""

from .base import DatasetAdapter, RecordError, RecordRef, Sample
from .chexpert import CheXpert
from .covidx import COVIDX_BINARY_CLASSES, COVIDX_CLASSES, Covidx
from .images import read_dicom, read_image, resize_uint8
from .mimic_cxr import MimicCxrJpg
from .object_cxr import FOREIGN_OBJECT, ObjectCxr
from .openi import OpenIDataset
from .rle import rle_decode, rle_encode
from .rsna import RsnaPneumonia
from .siim import SiimPneumothorax

__all__ = [
    "COVIDX_BINARY_CLASSES",
    "COVIDX_CLASSES",
    "FOREIGN_OBJECT",
    "CheXpert",
    "Covidx",
    "DatasetAdapter",
    "MimicCxrJpg",
    "ObjectCxr",
    "OpenIDataset",
    "RecordError",
    "RecordRef",
    "RsnaPneumonia",
    "Sample",
    "SiimPneumothorax",
    "read_dicom",
    "read_image",
    "resize_uint8",
    "rle_decode",
    "rle_encode",
]
