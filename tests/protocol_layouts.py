"""Clean, CI-size copies of six real dataset layouts (MIMIC-CXR-JPG, CheXpert-small, RSNA
Pneumonia, SIIM-ACR, COVIDx, Object-CXR) for the end-to-end protocol test.

Made from the real assets ``dataset_fixtures`` uses (16 real radiographs, the real CR DICOM,
torchxrayvision's CheXpert/RSNA/SIIM tables and Open-I reports); every record loads. Each
builder returns the folder its adapter takes as ``root``; all are deterministic.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import textwrap
import uuid
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from dataset_fixtures import (
    MIMIC_LABEL_COLUMNS,
    MIMIC_METADATA_COLUMNS,
    real_rsna_groups,
    real_table_rows,
    write_csv,
    write_kaggle_dicom,
    write_radiograph,
)
from PIL import Image

from sista_core.assets import CHEXPERT_LABELS, SIIM_RLE
from sista_core.findings import CHEXPERT_COMPETITION, CHEXPERT_OBSERVATIONS
from sista_core.reports.labeler import label_report
from sista_core.reports.openi import read_openi_reports

SEED = 20240611
PURE_PER_FINDING = 4  # CheXpert 5x200: rows positive for one competition finding only
VALID_POSITIVES = 2  # CheXpert valid rows positive for each competition finding


# --- shared writers ------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _png_bytes(jpeg: bytes) -> bytes:
    with Image.open(io.BytesIO(jpeg)) as img:
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_image(path: Path, index: int) -> tuple[int, int]:
    """Real radiograph ``index % 16`` (``write_radiograph``), as PNG when the name ends so."""
    size = write_radiograph(path, index % 16)
    if path.suffix.lower() == ".png":
        path.write_bytes(_png_bytes(path.read_bytes()))
    return size


class _KaggleDicoms:
    """RSNA/SIIM-style DICOMs: the first is written by ``write_kaggle_dicom``, the rest are
    copies of it with their own header ids (a full re-render costs ~45 ms each)."""

    def __init__(self) -> None:
        self.template: pydicom.Dataset | None = None

    def write(self, path: Path, patient_id: str, view: str, uids: tuple[str, str, str]) -> None:
        if self.template is None:
            write_kaggle_dicom(path, patient_id, view=view)
            self.template = pydicom.dcmread(path)
        dataset = self.template
        study, series, instance = uids
        dataset.PatientID = patient_id
        dataset.ViewPosition = view
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = instance
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(path)


def _digest(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


# --- MIMIC-CXR-JPG -------------------------------------------------------------------------


def _distinct_numbers(rng: np.random.Generator, low: int, high: int, count: int) -> list[str]:
    """``count`` distinct integers in [low, high), as strings, in drawing order."""
    numbers: dict[str, None] = {}
    while len(numbers) < count:
        numbers[str(int(rng.integers(low, high)))] = None
    return list(numbers)


def _mimic_report(report, view: str) -> str:
    """An Open-I report in the shape of a MIMIC-CXR free-text report."""

    def paragraph(text: str) -> str:
        return textwrap.fill(text, width=78, initial_indent=" ", subsequent_indent=" ")

    exam = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
    return (
        f"{'FINAL REPORT':>45}\n"
        f" EXAMINATION:  {exam}\n\n"
        f" INDICATION:  {report.indication or '___'}\n\n"
        f" COMPARISON:  {report.comparison or 'None.'}\n\n"
        f" FINDINGS:\n\n{paragraph(report.findings)}\n\n"
        f" IMPRESSION:\n\n{paragraph(report.impression)}\n"
    )


def _distinct_reports(count: int) -> list:
    """``count`` Open-I reports with findings and impression, distinct texts, alternating
    reports the labeler finds abnormal with normal ones."""
    pools: dict[bool, list] = {True: [], False: []}
    seen: set[str] = set()
    half = (count + 1) // 2
    for report in read_openi_reports():
        if not (report.findings and report.impression) or report.text in seen:
            continue
        abnormal = any(name != "No Finding" for name in label_report(report.text).positive())
        if len(pools[abnormal]) < half:
            pools[abnormal].append(report)
            seen.add(report.text)
        if min(map(len, pools.values())) >= half:
            break
    mixed = [r for pair in zip(pools[True], pools[False], strict=False) for r in pair]
    if len(mixed) < count:
        raise ValueError(f"only {len(mixed)} usable Open-I reports for {count} studies")
    return mixed[:count]


def build_mimic_cxr_jpg(root: Path, studies: int = 64) -> Path:
    """MIMIC-CXR-JPG 2.0.0 with its reports under the same root: ``studies`` studies of one
    frontal image each, subjects of 1-3 studies, official split by subject (~80/10/10)."""
    root = Path(root)
    rng = np.random.default_rng(SEED)
    sizes: list[int] = []
    while sum(sizes) < studies:
        sizes.append(int(rng.integers(1, 4)))
    sizes[-1] -= sum(sizes) - studies
    if len(sizes) < 3:
        raise ValueError("MIMIC-CXR needs at least 3 subjects (one per official split)")
    subjects = _distinct_numbers(rng, 10_000_000, 20_000_000, len(sizes))
    order = rng.permutation(len(subjects))
    n_held = max(1, round(0.1 * len(subjects)))
    split_of = {
        subjects[i]: "test" if rank < n_held else "validate" if rank < 2 * n_held else "train"
        for rank, i in enumerate(order)
    }
    reports = _distinct_reports(studies)
    study_ids = _distinct_numbers(rng, 50_000_000, 60_000_000, studies)
    metadata, splits, labels = [], [], []
    index = 0
    for subject, count in sorted(zip(subjects, sizes, strict=True)):
        year = int(rng.integers(2110, 2190))
        for visit in range(count):
            study = study_ids[index]
            report = reports[index]
            view = "PA" if rng.random() < 0.6 else "AP"
            h = _digest("mimic", subject, study)
            dicom_id = "-".join(h[i : i + 8] for i in range(0, 40, 8))
            folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            height, width = _write_image(folder / f"{dicom_id}.jpg", index)
            folder.with_suffix(".txt").write_text(_mimic_report(report, view))
            description = "CHEST (PA AND LAT)" if view == "PA" else "CHEST (PORTABLE AP)"
            date = f"{year + visit}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
            clock = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}"
            metadata.append(
                [dicom_id, subject, study, description, view, str(height), str(width), date]
                + [f"{clock}{int(rng.integers(0, 60)):02d}.{int(rng.integers(0, 1000)):03d}"]
                + [description]
                + ["postero-anterior" if view == "PA" else "antero-posterior"]
                + ["Erect" if view == "PA" else "Recumbent"]
            )
            splits.append([dicom_id, study, subject, split_of[subject]])
            found = label_report(report.text).labels()
            cells = [
                "" if name not in found else f"{found[name]:.1f}"
                for name in MIMIC_LABEL_COLUMNS[2:]
            ]
            labels.append([subject, study, *cells])
            index += 1
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_METADATA_COLUMNS, metadata, True)
    write_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        splits,
        compress=True,
    )
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABEL_COLUMNS, labels, True)
    return root


MIMIC_TABLES = (
    "mimic-cxr-2.0.0-metadata.csv.gz",
    "mimic-cxr-2.0.0-split.csv.gz",
    "mimic-cxr-2.0.0-chexpert.csv.gz",
)


def withhold_mimic_studies(root: Path, count: int, aside: Path) -> list[str]:
    """Take the last ``count`` studies of training subjects out of the MIMIC-CXR-JPG layout at
    ``root`` (their image and report files moved to ``aside``, their rows dropped from the
    three tables, the full tables kept there too), as if they had not been released yet;
    :func:`release_mimic_studies` puts them back. Returns the withheld images' dicom ids.
    Files that stay are not touched: their sizes and modification times are unchanged."""
    root, aside = Path(root), Path(aside)
    aside.mkdir(parents=True)
    with gzip.open(root / MIMIC_TABLES[1], "rt") as table:
        splits = list(csv.reader(table))[1:]
    train = [(dicom, study, subject) for dicom, study, subject, split in splits if split == "train"]
    withheld = train[-count:]
    studies = {study for _, study, _ in withheld}
    for name in MIMIC_TABLES:
        (root / name).rename(aside / name)
        with gzip.open(aside / name, "rt") as table:
            header, *rows = list(csv.reader(table))
        column = header.index("study_id")
        kept = [row for row in rows if row[column] not in studies]
        write_csv(root / name, header, kept, compress=True)
    for dicom, study, subject in withheld:
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        for relative in (folder / f"{dicom}.jpg", folder.with_suffix(".txt")):
            (aside / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).rename(aside / relative)
    return [dicom for dicom, _, _ in withheld]


def release_mimic_studies(root: Path, aside: Path) -> None:
    """Put the studies :func:`withhold_mimic_studies` took out back, with the full tables."""
    root, aside = Path(root), Path(aside)
    for path in sorted(aside.rglob("*")):
        if path.is_file():
            target = root / path.relative_to(aside)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)


# --- CheXpert ------------------------------------------------------------------------------


def _pure_finding(row: list[str], columns: dict[str, int]) -> str | None:
    """The competition finding a row is positive for with every other observation but
    ``No Finding`` 0.0 or blank (CheXpert 5x200, as MGCA samples it), else None."""
    positive = [name for name in CHEXPERT_COMPETITION if row[columns[name]] == "1.0"]
    if len(positive) != 1:
        return None
    others = (n for n in CHEXPERT_OBSERVATIONS if n not in ("No Finding", positive[0]))
    return positive[0] if all(row[columns[n]] in ("", "0.0") for n in others) else None


def build_chexpert_small(parent: Path, train_rows: int = 80, valid_rows: int = 20) -> Path:
    """``parent/CheXpert-v1.0-small`` from real rows of CheXpert's train table: ``train_rows``
    frontal rows (>= 4 single-finding positives per competition finding) plus ~10 % lateral
    rows of the same patients; ``valid_rows`` rows of other patients, binarised, as valid/."""
    if train_rows < PURE_PER_FINDING * len(CHEXPERT_COMPETITION):
        raise ValueError(f"train_rows must be >= {PURE_PER_FINDING * len(CHEXPERT_COMPETITION)}")
    root = Path(parent) / "CheXpert-v1.0-small"
    header, rows = real_table_rows(CHEXPERT_LABELS, max(4000, 25 * (train_rows + valid_rows)))
    columns = {name: header.index(name) for name in CHEXPERT_OBSERVATIONS}
    patient = [row[0].split("/")[2] for row in rows]
    frontal = [i for i, row in enumerate(rows) if row[3] == "Frontal"]
    chosen: list[int] = []
    quota = dict.fromkeys(CHEXPERT_COMPETITION, 0)
    for i in frontal:
        finding = _pure_finding(rows[i], columns)
        if finding and quota[finding] < PURE_PER_FINDING:
            quota[finding] += 1
            chosen.append(i)
    if min(quota.values()) < PURE_PER_FINDING:
        raise ValueError(f"too few single-finding rows in the scanned table: {quota}")
    for i in frontal:
        if len(chosen) >= train_rows:
            break
        if i not in chosen:
            chosen.append(i)
    train_patients = {patient[i] for i in chosen}
    laterals = [
        i for i, row in enumerate(rows) if row[3] == "Lateral" and patient[i] in train_patients
    ][: max(1, round(0.1 * train_rows))]
    train = sorted(chosen + laterals)
    if not any(rows[i][columns[name]] == "-1.0" for i in train for name in columns):
        raise ValueError("no uncertain (-1.0) label among the chosen train rows")

    # valid: frontal rows of patients after the train rows, no uncertain cell, one per patient
    candidates, seen = [], set(train_patients)
    for i in frontal:
        if i > max(train) and patient[i] not in seen and "-1.0" not in rows[i][5:]:
            candidates.append(i)
            seen.add(patient[i])
    valid, wanted = [], dict.fromkeys(CHEXPERT_COMPETITION, VALID_POSITIVES)
    for i in candidates:
        hits = [name for name in wanted if wanted[name] and rows[i][columns[name]] == "1.0"]
        if hits and len(valid) < valid_rows:
            valid.append(i)
            for name in hits:
                wanted[name] -= 1
    valid += [i for i in candidates if i not in valid][: valid_rows - len(valid)]

    index = 0
    for i in train:
        _write_image(root.joinpath(*rows[i][0].split("/")[1:]), index)
        index += 1
    write_csv(root / "train.csv", header, [rows[i] for i in train])
    valid_table = []
    for i in sorted(valid):
        path = f"CheXpert-v1.0-small/valid/{patient[i]}/study1/view1_frontal.jpg"
        _write_image(root.joinpath(*path.split("/")[1:]), index)
        index += 1
        labels = ["1.0" if value == "1.0" else "0.0" for value in rows[i][5:]]
        valid_table.append([path, *rows[i][1:5], *labels])
    write_csv(root / "valid.csv", header, valid_table)
    return root


# --- RSNA Pneumonia ------------------------------------------------------------------------


def build_rsna_pneumonia(root: Path, images: int = 60) -> Path:
    """stage_2_train_labels.csv with the real rows of ``images`` images (a third positive,
    with 1, 2 and 3 boxes) and their 1024 x 1024 DICOMs, one per patientId."""
    root = Path(root)
    groups = real_rsna_groups()
    by_count: dict[int, list[str]] = defaultdict(list)
    for patient_id, rows in groups.items():
        by_count[0 if rows[0][5] == "0" else len(rows)].append(patient_id)
    positives = round(images / 3)
    three = max(1, round(0.15 * positives))
    two = max(1, round(0.4 * positives))
    chosen = set(by_count[3][:three] + by_count[2][:two] + by_count[1][: positives - two - three])
    chosen |= set(by_count[0][: images - len(chosen)])
    dicoms, table = _KaggleDicoms(), []
    for number, patient_id in enumerate(p for p in groups if p in chosen):
        serial = int(_digest(patient_id)[:5], 16)
        tail = f"8323329.{20000 + number}.1517874{number % 1000:03d}.{serial}"
        uids = tuple(f"1.2.276.0.7230010.3.1.{kind}.{tail}" for kind in (2, 3, 4))
        view = "AP" if number % 2 else "PA"
        dicoms.write(root / "stage_2_train_images" / f"{patient_id}.dcm", patient_id, view, uids)
        table.extend(groups[patient_id])
    write_csv(
        root / "stage_2_train_labels.csv",
        ["patientId", "x", "y", "width", "height", "Target"],
        table,
    )
    return root


# --- SIIM-ACR Pneumothorax -----------------------------------------------------------------


def _siim_uids(image_id: str) -> tuple[str, str, str]:
    """Study, series and instance UIDs related as SIIM's are (``...3.1.4...`` = the ImageId;
    ``.2.``/``.3.`` and the last number minus 1/2 name the study and series)."""
    parts = image_id.split(".")
    if len(parts) != 12 or parts[7] != "4":
        digest = _digest(image_id)
        return (f"2.25.{int(digest[:16], 16)}", f"2.25.{int(digest[16:32], 16)}", image_id)
    last = int(parts[-1])
    study = ".".join([*parts[:7], "2", *parts[8:-1], str(last - 1)])
    series = ".".join([*parts[:7], "3", *parts[8:-1], str(last - 2)])
    return study, series, image_id


def build_siim_acr(root: Path, images: int = 60) -> Path:
    """train-rle.csv with the real rows of ``images`` images (half positive, some of 2+ mask
    parts) and their DICOMs under dicom-images-train/<study>/<series>/, one patient each."""
    root = Path(root)
    header, rows = real_table_rows(SIIM_RLE)
    groups: dict[str, list[str]] = defaultdict(list)
    for image_id, rle in rows:
        groups[image_id].append(rle)
    by_parts: dict[int, list[str]] = defaultdict(list)
    for image_id, parts in groups.items():
        if parts == ["-1"]:
            by_parts[0].append(image_id)
        elif "-1" not in [p.strip() for p in parts]:
            by_parts[min(len(parts), 3)].append(image_id)
    positives = images // 2
    many = max(1, round(0.1 * positives))
    two = max(1, round(0.25 * positives))
    chosen = set(by_parts[3][:many] + by_parts[2][:two] + by_parts[1][: positives - two - many])
    chosen |= set(by_parts[0][: images - len(chosen)])
    dicoms, table = _KaggleDicoms(), []
    for number, image_id in enumerate(i for i in groups if i in chosen):
        study, series, _ = uids = _siim_uids(image_id)
        patient_id = str(uuid.UUID(_digest("siim", image_id)[:32]))
        view = "AP" if number % 3 == 2 else "PA"
        path = root / "dicom-images-train" / study / series / f"{image_id}.dcm"
        dicoms.write(path, patient_id, view, uids)
        table.extend([image_id, rle] for rle in groups[image_id])
    write_csv(root / "train-rle.csv", header, table)  # header keeps " EncodedPixels"
    return root


# --- COVIDx --------------------------------------------------------------------------------


def _covid_entry(number: int) -> tuple[str, str, str]:
    """patient id, filename, source of a COVID-19 image, in the naming of its source."""
    digest = int(_digest("covidx", number)[:12], 16)
    source = ("cohen", "ricord", "bimcv")[number % 3]
    if source == "cohen":
        return str(100 + number), f"covid-19-pneumonia-{100 + number}-{digest % 9}.jpg", source
    if source == "ricord":
        a, b = 419000 + digest % 1000, f"{digest % 10000:06d}"
        return f"{a}-{b}", f"MIDRC-RICORD-1C-{a}-{b}-{digest % 90000 + 10000}-0.png", source
    subject, session = f"S0{3000 + number:04d}", f"E0{digest % 9000 + 1000:04d}"
    return f"sub-{subject}", f"sub-{subject}_ses-{session}_run-1_bp-chest_vp-ap_dx.png", source


def build_covidx(root: Path, train_per_class: int = 15, test_per_class: int = 5) -> Path:
    """train.txt / test.txt (``patient_id filename class source``) of normal, pneumonia and
    COVID-19 images, every image its own patient; normal and pneumonia are RSNA ids, as in
    COVIDx, taken from the end of the RSNA table."""
    root = Path(root)
    by_target: dict[str, list[str]] = defaultdict(list)
    for patient_id, rows in reversed(real_rsna_groups().items()):
        by_target["normal" if rows[0][5] == "0" else "pneumonia"].append(patient_id)
    per_split = {"train": train_per_class, "test": test_per_class}
    taken = {"normal": 0, "pneumonia": 0, "COVID-19": 0}
    index = 0
    for split, count in per_split.items():
        lines = []
        for label in taken:
            for _ in range(count):
                if label == "COVID-19":
                    patient_id, filename, source = _covid_entry(taken[label])
                else:
                    patient_id = by_target[label][taken[label]]
                    filename, source = f"{patient_id}.png", "rsna"
                taken[label] += 1
                _write_image(root / split / filename, index)
                index += 1
                lines.append(f"{patient_id} {filename} {label} {source}")
        order = np.random.default_rng(SEED).permutation(len(lines))
        (root / f"{split}.txt").write_text("".join(lines[i] + "\n" for i in order))
    return root


# --- Object-CXR ----------------------------------------------------------------------------


def _object_annotation(rng: np.random.Generator, height: int, width: int, first: int) -> str:
    """1-3 shapes inside a (height, width) image, kinds cycling from ``first``."""
    shapes = []
    for k in range(int(rng.integers(1, 4))):
        kind = (first + k) % 3
        side = int(rng.integers(6, 30))
        x0 = int(rng.integers(0, width - side - 1))
        y0 = int(rng.integers(0, height - side - 1))
        if kind in (0, 1):
            shapes.append(f"{kind} {x0} {y0} {x0 + side} {y0 + side}")
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            xs = np.rint(x0 + side / 2 * (1 + np.cos(angles))).astype(int)
            ys = np.rint(y0 + side / 2 * (1 + np.sin(angles))).astype(int)
            shapes.append("2 " + " ".join(f"{x} {y}" for x, y in zip(xs, ys, strict=True)))
    return ";".join(shapes)


def build_object_cxr(root: Path, train: int = 40, dev: int = 10) -> Path:
    """train.csv / dev.csv (``image_name,annotation``) and images under train/ and dev/;
    every other image has 1-3 foreign objects (rectangles, ellipses, polygons)."""
    root = Path(root)
    rng = np.random.default_rng(SEED)
    index = 0
    for split, count, first_number in (("train", train, 1), ("dev", dev, 8001)):
        rows = []
        for k in range(count):
            name = f"{first_number + k:05d}.jpg"
            height, width = _write_image(root / split / name, index)
            annotation = _object_annotation(rng, height, width, k // 2) if k % 2 == 0 else ""
            rows.append([name, annotation])
            index += 1
        write_csv(root / f"{split}.csv", ["image_name", "annotation"], rows)
    return root


# --- all -----------------------------------------------------------------------------------


def build_all(root: Path) -> dict[str, Path]:
    """All six layouts under ``root`` with the defaults: name -> the adapter's ``root``."""
    root = Path(root)
    return {
        "mimic_cxr": build_mimic_cxr_jpg(root / "mimic-cxr-jpg" / "2.0.0"),
        "chexpert": build_chexpert_small(root / "chexpert"),
        "rsna": build_rsna_pneumonia(root / "rsna-pneumonia-detection-challenge"),
        "siim": build_siim_acr(root / "siim-acr-pneumothorax"),
        "covidx": build_covidx(root / "covidx-cxr"),
        "object_cxr": build_object_cxr(root / "object-CXR"),
    }
