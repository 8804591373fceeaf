"""Offline assets that ship inside installed PyPI packages, located without importing them
(torchxrayvision's import pulls heavy dependencies we do not need; we only read its files)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_folder(package: str) -> Path:
    """Folder of an installed top-level package, found without executing its ``__init__``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; `make venv` installs the data packages"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package; a clear error when the package lacks it."""
    path = package_folder(package) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} not found inside the installed package {package!r}")
    return path


def xrv_data_file(name: str) -> Path:
    """A file of torchxrayvision's data folder (Open-I reports, lung masks, label tables)."""
    return package_file("torchxrayvision", f"data/{name}")


OPENI_REPORTS = "NLMCXR_reports.tgz"
LUNG_MASKS = "semantic_masks_v7labs_lungs.zip"
CHEXPERT_LABELS = "chexpert_train.csv.gz"
RSNA_BOXES = "kaggle_stage_2_train_labels.csv.zip"
SIIM_RLE = "siim-pneumothorax-train-rle.csv.gz"


def real_radiograph_files() -> list[Path]:
    """The 16 real chest radiographs (JPEG) shipped by ``pneumonia-model-package``."""
    folder = package_file("pneumonia_model_package", "datasets/pneumonia-data/val")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg"})


def real_chest_dicom() -> Path:
    """One real chest CR DICOM (MONOCHROME1) shipped by ``pydicom-data``."""
    return package_file("data_store", "data/RG1_UNCI.dcm")
