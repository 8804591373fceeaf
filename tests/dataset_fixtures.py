"""Builders of small copies of each real dataset layout, made from real radiographs (16 JPEGs
of ``pneumonia-model-package``, the CR DICOM of ``pydicom-data``) and real table rows
(torchxrayvision's CheXpert, RSNA and SIIM tables), plus one broken record of each kind.

Each builder writes into a folder and returns a ``Layout``: which record ids must load and
which must fail, with the reason ``RecordError`` must give.
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from sista_core.assets import (
    CHEXPERT_LABELS,
    RSNA_BOXES,
    SIIM_RLE,
    real_chest_dicom,
    real_radiograph_files,
    xrv_data_file,
)
from sista_core.datasets import DatasetAdapter, RecordError, Sample
from sista_core.datasets.mimic_cxr import METADATA_COLUMNS as MIMIC_METADATA_COLUMNS

FIXTURE_SIDE = 256  # JPEG fixtures are real radiographs shrunk to this longest side
KAGGLE_SIDE = 1024  # RSNA and SIIM DICOMs are 1024 x 1024, 8-bit MONOCHROME2


@dataclass
class Layout:
    """A built dataset folder and what loading it must give."""

    root: Path
    good: set[str] = field(default_factory=set)
    broken: dict[str, str] = field(default_factory=dict)  # record id -> RecordError reason
    notes: dict = field(default_factory=dict)  # builder-specific expectations


def load_all(adapter: DatasetAdapter) -> tuple[dict[str, Sample], dict[str, str]]:
    """Load every listed record: samples by id, and RecordError reasons by id."""
    samples, reasons = {}, {}
    for ref in adapter.records():
        try:
            samples[ref.record_id] = adapter.load(ref)
        except RecordError as error:
            assert error.record_id == ref.record_id
            reasons[ref.record_id] = error.reason
    return samples, reasons


# --- images --------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _radiograph_jpeg_bytes(index: int) -> bytes:
    with Image.open(real_radiograph_files()[index % 16]) as img:
        img.draft("L", (FIXTURE_SIDE, FIXTURE_SIDE))
        small = img.convert("L")
        small.thumbnail((FIXTURE_SIDE, FIXTURE_SIDE))
        buffer = io.BytesIO()
        small.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_radiograph(path: Path, index: int) -> tuple[int, int]:
    """Write real radiograph ``index`` (0..15) as a small JPEG; returns its (H, W)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _radiograph_jpeg_bytes(index)
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as img:
        return img.height, img.width


def write_truncated_jpeg(path: Path) -> None:
    """A real JPEG cut in half, as an interrupted download leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _radiograph_jpeg_bytes(0)
    path.write_bytes(data[: len(data) // 2])


def write_zero_byte(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def write_tiny_jpeg(path: Path) -> None:
    """A valid JPEG of 32 x 24 pixels: below any usable radiograph size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(_radiograph_jpeg_bytes(1))) as img:
        img.resize((32, 24)).save(path, format="JPEG")


BROKEN_JPEG_WRITERS = {
    "truncated_image": write_truncated_jpeg,
    "zero_byte_file": write_zero_byte,
    "image_too_small": write_tiny_jpeg,
}


def write_jpeg_case(path: Path, case: str, index: int) -> None:
    """Write the JPEG for a fixture case: a real radiograph (``good``), a broken file named by
    the reason it must raise, or nothing (``missing_file``)."""
    if case in BROKEN_JPEG_WRITERS:
        BROKEN_JPEG_WRITERS[case](path)
    elif case != "missing_file":
        write_radiograph(path, index)


# --- DICOM ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _real_dicom_pixels() -> np.ndarray:
    return pydicom.dcmread(real_chest_dicom()).pixel_array


def real_dicom_resized(height: int, width: int) -> np.ndarray:
    """The real CR image (MONOCHROME1, 15-bit values) resampled to (height, width), uint16."""
    image = Image.fromarray(_real_dicom_pixels().astype(np.float32))
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return np.rint(resized).astype(np.uint16)


def write_cr_dicom(path: Path, patient_id: str, side: int = 256) -> pydicom.Dataset:
    """A copy of the real CR DICOM (MONOCHROME1, window 15000/30000) shrunk to ``side``."""
    dataset = pydicom.dcmread(real_chest_dicom())
    pixels = real_dicom_resized(side, side)
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = pixels.tobytes()
    dataset.PatientID = patient_id
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path)
    return dataset


def write_kaggle_dicom(
    path: Path, patient_id: str, side: int = KAGGLE_SIDE, view: str = "PA"
) -> np.ndarray:
    """A DICOM shaped like RSNA's and SIIM's (8-bit MONOCHROME2, no window) made from the
    real CR image; returns the stored pixels (H, W) uint8."""
    raw = real_dicom_resized(side, side).astype(np.float32)
    pixels = np.rint(255 * (raw.max() - raw) / (raw.max() - raw.min())).astype(np.uint8)
    dataset = pydicom.dcmread(real_chest_dicom())
    for keyword in ("WindowCenter", "WindowWidth"):
        delattr(dataset, keyword)
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = pixels.tobytes()
    dataset.PatientID = patient_id
    dataset.ViewPosition = view
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path)
    return pixels


def write_dicom_without_pixels(path: Path, patient_id: str) -> None:
    dataset = pydicom.dcmread(real_chest_dicom(), stop_before_pixels=True)
    dataset.PatientID = patient_id
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path)


def write_rgb_dicom(path: Path, patient_id: str, side: int = 128) -> None:
    """A well-formed RGB DICOM (a photographed film, say): unsupported photometric."""
    dataset = pydicom.dcmread(real_chest_dicom())
    gray = np.rint(real_dicom_resized(side, side) / 128).clip(0, 255).astype(np.uint8)
    for keyword in ("WindowCenter", "WindowWidth"):
        delattr(dataset, keyword)
    dataset.PhotometricInterpretation = "RGB"
    dataset.SamplesPerPixel, dataset.PlanarConfiguration = 3, 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.Rows = dataset.Columns = side
    dataset.PixelData = np.repeat(gray[..., None], 3, axis=2).tobytes()
    dataset.PatientID = patient_id
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path)


def write_truncated_dicom(path: Path, patient_id: str) -> None:
    """A DICOM whose file stops halfway through its pixel data."""
    write_kaggle_dicom(path, patient_id, side=256)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 256 * 128])


# --- tables --------------------------------------------------------------------------------


def write_csv(path: Path, header: list[str], rows: list[list[str]], compress: bool = False):
    """Write a CSV (gzip-compressed when ``compress``); rows may be short, as broken ones are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)


def real_table_rows(name: str, count: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one of torchxrayvision's real tables (gz or zip)."""
    path = xrv_data_file(name)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            text = archive.read(archive.namelist()[0]).decode("utf-8")
    else:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    rows = [row for _, row in zip(range(count), reader, strict=False)] if count else list(reader)
    return header, rows


# --- MIMIC-CXR-JPG -------------------------------------------------------------------------

MIMIC_LABEL_COLUMNS = [
    "subject_id",
    "study_id",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough.

 COMPARISON:  None.

 FINDINGS:

 There is a small left pleural effusion. The heart size is normal. No pneumothorax.

 IMPRESSION:

 Small left pleural effusion.
"""


def build_mimic_cxr(root: Path) -> Layout:
    """MIMIC-CXR-JPG 2.0.0 layout with reports under the same root."""
    layout = Layout(root)
    # dicom_id, subject, study, view, split, what to write
    images = [
        ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", "train"),
        ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", ""),
        ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", "train"),
        ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "PA", "validate"),
        ("ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c", "10000898", "50771383", "PA", "test"),
        ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "10001038", "58224503", "AP", "train"),
        ("a917c883-720a5bbf-02c84fc6-98ad00ac-c562ff80", "10001122", "50000014", "PA", "train"),
        ("8959e402-2175d68d-edba5a6c-520b5a47-0b0b3e0c", "10001176", "53186264", "PA", "train"),
    ]
    cases = ["good", "good", "good", "truncated_image", "missing_file", "missing_report"]
    cases += ["zero_byte_file", "image_too_small"]
    for index, ((dicom_id, subject, study, view, _), case) in enumerate(
        zip(images, cases, strict=True)
    ):
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        write_jpeg_case(folder / f"{dicom_id}.jpg", case, index)
        if case != "missing_report":
            folder.with_suffix(".txt").write_text(MIMIC_REPORT)
        if case != "good":
            layout.broken[dicom_id] = case
        elif view in ("PA", "AP"):
            layout.good.add(dicom_id)
    metadata = [
        [dicom_id, subject, study, "CHEST (PA AND LAT)", view, "3056", "2544", "21800506"]
        + ["213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"]
        for dicom_id, subject, study, view, _ in images
    ]
    metadata.append(["0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c", "10002013", "51178377"])
    layout.broken["0c4eb1e1-b801903c-bcebe8a4-3da9cd3c-3b94a27c"] = "bad_row"
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA_COLUMNS, metadata, True)
    splits = [[d, study, subject, split] for d, subject, study, _, split in images if split]
    write_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        splits,
        compress=True,
    )
    blank = [""] * 14
    first = list(blank)
    first[MIMIC_LABEL_COLUMNS.index("Pleural Effusion") - 2] = "1.0"
    first[MIMIC_LABEL_COLUMNS.index("Pneumothorax") - 2] = "0.0"
    first[MIMIC_LABEL_COLUMNS.index("Atelectasis") - 2] = "-1.0"
    no_finding = list(blank)
    no_finding[MIMIC_LABEL_COLUMNS.index("No Finding") - 2] = "1.0"
    label_rows = [["10000032", "50414267", *first], ["10000764", "57375967", *no_finding]]
    label_rows += [["10001038", "58224503", *no_finding]]  # study 53189527 has no label row
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABEL_COLUMNS, label_rows, True)
    layout.notes["labelled_study"] = images[0][0]
    layout.notes["unlabelled"] = images[2][0]
    layout.notes["lateral"] = images[1][0]
    layout.notes["no_report"] = images[5][0]
    return layout


# --- CheXpert ------------------------------------------------------------------------------


def build_chexpert(parent: Path) -> Layout:
    """CheXpert-v1.0-small with the first 11 real rows of train.csv (8 frontal, 3 lateral),
    six broken frontal rows, and a two-row valid.csv."""
    root = parent / "CheXpert-v1.0-small"
    layout = Layout(root)
    header, rows = real_table_rows(CHEXPERT_LABELS, 11)
    for index, row in enumerate(rows):
        write_radiograph(root.joinpath(*row[0].split("/")[1:]), index)
        record_id = "/".join(row[0].split("/")[2:5])[: -len(".jpg")]
        if row[3] == "Frontal":
            layout.good.add(record_id)
        else:
            layout.notes.setdefault("laterals", set()).add(record_id)
    template = rows[0]
    broken_kinds = {
        "patient90001": "truncated_image",
        "patient90002": "zero_byte_file",
        "patient90003": "missing_file",
        "patient90004": "image_too_small",
        "patient90005": "bad_row",  # row cut short
        "patient90006": "bad_row",  # label value 2.0
    }
    for patient, reason in broken_kinds.items():
        path = f"CheXpert-v1.0-small/train/{patient}/study1/view1_frontal.jpg"
        image = root / "train" / patient / "study1" / "view1_frontal.jpg"
        row = [path, *template[1:]]
        write_jpeg_case(image, reason if reason != "bad_row" else "good", 3)
        if patient == "patient90005":
            row = row[:8]
        elif patient == "patient90006":
            row[header.index("Edema")] = "2.0"
        rows.append(row)
        layout.broken[f"{patient}/study1/view1_frontal"] = reason
    write_csv(root / "train.csv", header, rows)
    valid = []
    for index, patient in enumerate(("patient64541", "patient64542")):
        path = f"CheXpert-v1.0-small/valid/{patient}/study1/view1_frontal.jpg"
        write_radiograph(root.joinpath(*path.split("/")[1:]), 10 + index)
        labels = ["1.0" if column == "Cardiomegaly" else "0.0" for column in header[5:]]
        valid.append([path, "Male", "73", "Frontal", "AP", *labels])
    write_csv(root / "valid.csv", header, valid)
    return layout


# --- RSNA Pneumonia ------------------------------------------------------------------------


def real_rsna_groups() -> dict[str, list[list[str]]]:
    """Real RSNA rows grouped by patientId, in file order."""
    _, rows = real_table_rows(RSNA_BOXES)
    groups: dict[str, list[list[str]]] = defaultdict(list)
    for row in rows:
        groups[row[0]].append(row)
    return groups


def build_rsna(root: Path) -> Layout:
    """stage_2_train_labels.csv with real rows of images with 0, 1, 2 and 3 boxes, their
    DICOMs, and one record of each broken DICOM kind plus a short row."""
    layout = Layout(root)
    groups = real_rsna_groups()
    by_count: dict[int, list[str]] = defaultdict(list)
    for patient_id, rows in groups.items():
        count = 0 if rows[0][5] == "0" else len(rows)
        by_count[count].append(patient_id)
    chosen = [by_count[0][0], by_count[0][1], by_count[1][0], by_count[2][0], by_count[3][0]]
    images = root / "stage_2_train_images"
    table = []
    for patient_id in chosen:
        write_kaggle_dicom(images / f"{patient_id}.dcm", patient_id)
        table.extend(groups[patient_id])
        layout.good.add(patient_id)
    layout.notes["box_counts"] = {
        p: (0 if groups[p][0][5] == "0" else len(groups[p])) for p in chosen
    }
    layout.notes["real_rows"] = {p: groups[p] for p in chosen}
    spare = [by_count[0][i] for i in range(2, 10)]  # real negative ids reused for broken files
    broken = {
        spare[0]: ("no_pixel_data", write_dicom_without_pixels),
        spare[1]: ("unsupported_photometric", write_rgb_dicom),
        spare[2]: ("truncated_image", write_truncated_dicom),
        spare[3]: ("zero_byte_file", lambda path, _: write_zero_byte(path)),
        spare[4]: ("missing_file", None),
        spare[5]: ("image_too_small", lambda path, pid: write_kaggle_dicom(path, pid, side=32)),
    }
    for patient_id, (reason, writer) in broken.items():
        if writer is not None:
            writer(images / f"{patient_id}.dcm", patient_id)
        table.extend(groups[patient_id])
        layout.broken[patient_id] = reason
    table.append([spare[6], "264.0", "152.0"])  # short row
    layout.broken[spare[6]] = "bad_row"
    write_csv(
        root / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        table,
    )
    return layout


# --- SIIM-ACR Pneumothorax -----------------------------------------------------------------


def build_siim(root: Path) -> Layout:
    """train-rle.csv with real rows (images of 1, 2 and 3 mask parts, and negatives), their
    DICOMs under study/series folders, a missing DICOM and an out-of-grid mask."""
    layout = Layout(root)
    header, rows = real_table_rows(SIIM_RLE)
    groups: dict[str, list[str]] = defaultdict(list)
    for image_id, rle in rows:
        groups[image_id].append(rle)
    by_parts: dict[int, list[str]] = defaultdict(list)
    for image_id, parts in groups.items():
        by_parts[0 if parts == ["-1"] else len(parts)].append(image_id)
    chosen = [by_parts[1][0], by_parts[2][0], by_parts[3][0], by_parts[0][0], by_parts[0][1]]
    table = []
    images = root / "dicom-images-train"
    for index, image_id in enumerate(chosen):
        study = f"1.2.276.0.7230010.3.1.2.8323329.{9000 + index}.1517875200.1"
        series = f"1.2.276.0.7230010.3.1.3.8323329.{9000 + index}.1517875200.2"
        write_kaggle_dicom(images / study / series / f"{image_id}.dcm", f"patient-{index}")
        table.extend([image_id, rle] for rle in groups[image_id])
        layout.good.add(image_id)
    layout.notes["rle"] = {image_id: groups[image_id] for image_id in chosen}
    missing = by_parts[1][1]
    table.extend([missing, rle] for rle in groups[missing])
    layout.broken[missing] = "missing_file"
    out_of_grid = by_parts[1][2]
    write_kaggle_dicom(images / "9" / "9" / f"{out_of_grid}.dcm", "patient-9")
    table.append([out_of_grid, f"{KAGGLE_SIDE * KAGGLE_SIDE - 5} 10"])
    layout.broken[out_of_grid] = "bad_mask"
    write_csv(root / "train-rle.csv", header, table)  # header keeps " EncodedPixels"
    return layout


# --- COVIDx --------------------------------------------------------------------------------


def build_covidx(root: Path) -> Layout:
    """train.txt/test.txt in COVID-Net's format with images under train/ and test/."""
    layout = Layout(root)
    good = [
        ("3", "SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg", "pneumonia", "cohen"),
        ("17", "jkms-35-e79-g001-l-a.jpg", "COVID-19", "cohen"),
        (
            "8989e25c-a698-48fc-b428-fff56931fc8f",
            "8989e25c-a698-48fc-b428-fff56931fc8f.png",
            "normal",
            "rsna",
        ),
        ("419639-003251", "MIDRC-RICORD-1C-419639-003251-46647-0.png", "COVID-19", "ricord"),
    ]
    lines = []
    for index, (patient, filename, label, source) in enumerate(good):
        write_radiograph(root / "train" / filename, index)
        lines.append(f"{patient} {filename} {label} {source}")
        layout.good.add(filename)
    layout.notes["classes"] = {filename: label for _, filename, label, _ in good}
    write_truncated_jpeg(root / "train" / "truncated-1.jpg")
    lines.append("201 truncated-1.jpg COVID-19 cohen")
    layout.broken["truncated-1.jpg"] = "truncated_image"
    lines.append("202 not-downloaded.png normal rsna")
    layout.broken["not-downloaded.png"] = "missing_file"
    write_radiograph(root / "train" / "odd-class.png", 5)
    lines.append("203 odd-class.png tuberculosis cohen")
    layout.broken["odd-class.png"] = "bad_row"
    lines.append("204 missing-source.png")
    layout.broken["train.txt:8"] = "bad_row"
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    write_radiograph(root / "test" / "test-1.png", 6)
    (root / "test.txt").write_text("900 test-1.png normal rsna\n")
    return layout


# --- Object-CXR ----------------------------------------------------------------------------


def build_object_cxr(root: Path) -> Layout:
    """train.csv/dev.csv (image_name,annotation) with rectangle, ellipse and polygon shapes
    in each image's own pixels; images under train/ and dev/."""
    layout = Layout(root)
    sizes = {
        name: write_radiograph(root / "train" / name, i)
        for i, name in enumerate(["00001.jpg", "00002.jpg", "00003.jpg", "00004.jpg", "00005.jpg"])
    }
    height, width = sizes["00003.jpg"]
    annotations = {
        "00001.jpg": "0 40 50 80 90",
        "00002.jpg": "1 100 60 140 120;0 20 30 40 45",
        "00003.jpg": f"2 30 30 60 35 50 70;0 {width - 10} {height - 10} {width + 40} {height + 40}",
        "00004.jpg": "",
        "00005.jpg": "3 1 2 3 4",
    }
    for name in annotations:
        if name != "00005.jpg":
            layout.good.add(name[:-4])
    layout.broken["00005"] = "bad_annotation"
    rows = [[name, annotation] for name, annotation in annotations.items()]
    write_truncated_jpeg(root / "train" / "00006.jpg")
    rows.append(["00006.jpg", ""])
    layout.broken["00006"] = "truncated_image"
    rows.append(["00007.jpg", "0 1 1 20 20"])
    layout.broken["00007"] = "missing_file"
    rows.append(["00008.jpg"])
    layout.broken["00008"] = "bad_row"
    write_csv(root / "train.csv", ["image_name", "annotation"], rows)
    write_radiograph(root / "dev" / "08001.jpg", 7)
    write_csv(root / "dev.csv", ["image_name", "annotation"], [["08001.jpg", "0 10 10 50 50"]])
    layout.notes["sizes"] = sizes
    layout.notes["annotations"] = annotations
    return layout


# --- MIMIC-CXR-JPG with one record of every problem ingest quarantines ------------------

# study case -> (what the image is, what the report is, expected quarantine reason or None)
MIMIC_CASES = {
    "good-1": ("good", MIMIC_REPORT, None),
    "good-2": ("good", MIMIC_REPORT, None),
    "good-3": ("good", "FINDINGS: Small left effusion.\nIMPRESSION: Effusion.", None),
    "good-4": ("good", MIMIC_REPORT, None),
    "truncated": ("truncated_image", MIMIC_REPORT, "truncated_image"),
    "zero-byte": ("zero_byte_file", MIMIC_REPORT, "zero_byte_file"),
    "missing": ("missing_file", MIMIC_REPORT, "missing_file"),
    "tiny": ("image_too_small", MIMIC_REPORT, "image_too_small"),
    "empty-report": ("good", "   \n", "empty_report"),
    "non-utf8": ("good", b"FINDINGS: \xff\xfe effusion \x81", "non_utf8_report"),
    "deid-only": ("good", "FINDINGS: ___ ___.\nIMPRESSION: XXXX.", "report_only_deid"),
    "xxxx-only": ("good", "XXXX XXXX XXXX.", "report_only_deid"),  # Open-I's placeholder
}


def build_mimic_with_every_problem(root):
    metadata, splits, expected = [], [], {}
    for number, (case, (image, report, reason)) in enumerate(MIMIC_CASES.items()):
        subject, study, dicom_id = f"1{number:07d}", f"5{number:07d}", f"{case}-dicom"
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True)
        write_jpeg_case(folder / f"{dicom_id}.jpg", image, number)
        report_path = folder.with_suffix(".txt")
        if isinstance(report, bytes):
            report_path.write_bytes(report)
        else:
            report_path.write_text(report)
        metadata.append(
            [
                dicom_id,
                subject,
                study,
                "CHEST",
                "PA",
                "2544",
                "3056",
                "21800506",
                "213014.531",
                "CHEST",
                "postero-anterior",
                "Erect",
            ]
        )
        splits.append([dicom_id, study, subject, "train"])
        expected[dicom_id] = reason
    # the same dicom id listed twice: the second copy is a duplicate
    metadata.append(list(metadata[0]))
    splits.append(list(splits[0]))
    # a metadata row with missing columns
    metadata.append(["short-row-dicom", "19999999", "59999999"])
    expected["short-row-dicom"] = "bad_row"
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA_COLUMNS, metadata, True)
    write_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        splits,
        True,
    )
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABEL_COLUMNS, [], True)
    return expected


def check_counts_add_up(result, expected: dict[str, str | None], duplicates: int = 0):
    quarantined = {row["record_id"]: row["reason"] for row in result.quarantine_rows}
    kept = [row["record_id"] for row in result.manifest_rows]
    for record_id, reason in expected.items():
        if reason is None:
            assert record_id in kept, record_id
        else:
            assert quarantined.get(record_id) == reason, (record_id, quarantined.get(record_id))
    assert len(kept) == len(set(kept)) == sum(r is None for r in expected.values())
    assert len(kept) + len(result.quarantine_rows) == len(expected) + duplicates
