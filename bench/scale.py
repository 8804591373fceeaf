"""Scale benchmark: the first four stages at two dataset sizes, side by side.

A MIMIC-CXR-JPG 2.0.0 layout of N images (phantom JPEGs at 512 px, real Open-I reports in
MIMIC's report files, the official metadata, split and CheXpert tables) is written to moto's
S3 server, a real process on 127.0.0.1. The stages ingest, reports, similarity and pretrain
(the default profile's model; one epoch cut at ``--pretrain-steps`` steps, SISTA only) then
run one after another as ``python -m pipeline.launch STAGE`` with the dataset and the stage
folders on S3, as on a cluster: ingest lists the tables and its Ray tasks fetch the images.

For each stage and size: wall time, images per second, and the peak resident memory of every
process the stage starts (the stage's own process, each kind of Ray worker, Ray's daemons),
read from ``/proc/<pid>/status`` (VmHWM, the kernel's high-water mark) every 0.2 s. The ratio
between the sizes says what grows with the dataset: time should, memory should not.

    python -m bench.scale                          # 2,000 and 20,000 images
    python -m bench.scale --sizes 200,2000 --pretrain-steps 3
    python -m bench.scale --stages ingest          # ingest alone at both sizes
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import yaml
from PIL import Image

from components.platform import storage
from pipeline.local_services import S3Server
from sista_core.datasets.embedded import as_free_text
from sista_core.datasets.mimic_cxr import (
    METADATA_COLUMNS,
    METADATA_CSV,
    SPLIT_CSV,
    study_folder,
)
from sista_core.findings import CHEXPERT_OBSERVATIONS
from sista_core.phantom import render
from sista_core.reports import label_report, read_openi_reports

STAGES = ("ingest", "reports", "similarity", "pretrain")
ROOT = Path(__file__).resolve().parents[1]
# Ray's own processes (daemons, agents, Ray Data's and Ray Train's bookkeeping actors):
# measured like the others, summarised in one line of the table.
RAY_INTERNALS = (
    "ray daemons",
    "ray worker (idle)",
    "ray::ActorLocationTracker",
    "ray::DashboardAgent",
    "ray::DatasetManager",
    "ray::PlacementGroupCleaner",
    "ray::PreemptionWatcher",
    "ray::RuntimeEnvAgent",
    "ray::SynchronizationActor",
    "ray::_AutoscalingCoordinatorActor",
    "ray::_StatsActor",
)
DISTINCT_IMAGES = 64  # rendered once, then reused: decoding cost is per file, not per picture


def _csv_gz(header: list[str], rows: list[list[str]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return gzip.compress(text.getvalue().encode(), mtime=0)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_mimic_layout(uri: str, images: int, image_px: int) -> dict[str, Any]:
    """MIMIC-CXR-JPG with its reports below ``uri``: ``images`` studies of one PA image,
    two studies per subject, the official split by subject (90/5/5)."""
    reports = read_openi_reports()
    labels = [label_report(report.text).labels() for report in reports]
    pictures = [
        _jpeg(render(label_report(reports[i].text).findings, seed=i, size=image_px).image)
        for i in range(DISTINCT_IMAGES)
    ]
    objects: dict[str, bytes] = {}
    metadata, splits, label_rows = [], [], []
    for index in range(images):
        subject, study = str(10_000_000 + index // 2), str(50_000_000 + index)
        dicom_id = hashlib.sha1(f"scale-{index}".encode()).hexdigest()[:40]
        dicom_id = "-".join(dicom_id[i : i + 8] for i in range(0, 40, 8))
        folder = study_folder(subject, study).as_posix()
        report = reports[index % len(reports)]
        objects[f"{folder}/{dicom_id}.jpg"] = pictures[index % DISTINCT_IMAGES]
        objects[f"{folder}.txt"] = f"FINAL REPORT\n{as_free_text(report)}\n".encode()
        metadata.append(
            [dicom_id, subject, study, "CHEST (PA AND LAT)", "PA", str(image_px), str(image_px)]
            + ["21800506", "213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"]
        )
        rank = (index // 2) % 20  # subjects in a fixed rotation: 18 train, 1 val, 1 test
        split = "test" if rank == 19 else "validate" if rank == 18 else "train"
        splits.append([dicom_id, study, subject, split])
        found = labels[index % len(reports)]
        label_rows.append(
            [
                subject,
                study,
                *("" if n not in found else f"{found[n]:.1f}" for n in CHEXPERT_OBSERVATIONS),
            ]
        )
    objects[METADATA_CSV] = _csv_gz(METADATA_COLUMNS, metadata)
    objects[SPLIT_CSV] = _csv_gz(["dicom_id", "study_id", "subject_id", "split"], splits)
    objects["mimic-cxr-2.0.0-chexpert.csv.gz"] = _csv_gz(
        ["subject_id", "study_id", *CHEXPERT_OBSERVATIONS], label_rows
    )
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(lambda item: storage.write_bytes(f"{uri}/{item[0]}", item[1]), objects.items())
        )
    return {"objects": len(objects), "bytes": sum(len(b) for b in objects.values())}


class PeakMemory:
    """The peak memory of a process and every process below it, polled in a thread: VmHWM
    (the kernel's high-water mark of its resident set, which also counts the shared pages it
    maps: Ray's object store, memory-mapped files) and the largest RssAnon seen (its private
    memory). Each process is named by its Ray task or actor when it has one."""

    def __init__(self, pid: int, interval_s: float = 0.2) -> None:
        self.root, self.interval = pid, interval_s
        self.peaks: dict[int, dict[str, int]] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [psutil.Process(self.root)]
                processes += processes[0].children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    name = self._name(process)
                except (OSError, psutil.Error):
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                if "VmHWM" not in fields:  # a zombie: its memory is gone
                    continue
                peak = self.peaks.setdefault(process.pid, {"rss": 0, "private": 0})
                peak["rss"] = max(peak["rss"], int(fields["VmHWM"].split()[0]))
                peak["private"] = max(peak["private"], int(fields["RssAnon"].split()[0]))
                if name != "ray worker (idle)" or process.pid not in self.names:
                    self.names[process.pid] = name
            self._stop.wait(self.interval)

    def _name(self, process: psutil.Process) -> str:
        if process.pid == self.root:
            return "stage process"
        command = process.cmdline()
        title = command[0] if command else process.name()
        if title.startswith("ray::"):
            task = title[len("ray::") :].split()[0]
            return "ray worker (idle)" if task == "IDLE" else f"ray::{task}"
        return "ray daemons"  # gcs_server, raylet, dashboard, log monitor, agents

    def stop(self) -> dict[str, dict[str, float]]:
        """Per process name (the largest process of each name): peak RSS and peak private
        memory in MB."""
        self._stop.set()
        self._thread.join()
        by_name: dict[str, dict[str, float]] = {}
        for pid, peak in self.peaks.items():
            entry = by_name.setdefault(self.names.get(pid, "ray daemons"), {})
            for kind, kilobytes in peak.items():
                entry[kind] = max(entry.get(kind, 0.0), kilobytes / 1024)
        return dict(sorted(by_name.items()))


def bench_params(work: Path, source: str, prefix: str, steps: int) -> Path:
    """The default profile (params.yaml) reading the MIMIC layout at ``source``, stage folders
    on S3 below ``prefix``, one pre-training epoch of ``steps`` steps, a tiny downstream set."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["storage"].update(uri=prefix, local_dir=str(work / "data"))
    params["mlflow"].update(
        tracking_uri=f"sqlite:///{work / 'mlflow.db'}", artifact_root=str(work / "mlartifacts")
    )
    ingest = params["ingest"]
    ingest.update(source="mimic_cxr", source_path=source)
    ingest["downstream"]["sets"] = {
        "phantom_classification": {
            "adapter": "phantom_classification",
            "patients": 40,
            "val_fraction": 0.25,
            "test_fraction": 0.25,
        }
    }
    params["evaluate"]["tasks"] = {"classification": ["phantom_classification"]}
    params["publish"]["metric"] = None
    params["pretrain"]["optim"].update(epochs=1, max_steps_per_epoch=steps)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_stage(work: Path, stage: str, env: dict[str, str], log: Path) -> dict[str, Any]:
    args = [sys.executable, "-m", "pipeline.launch", stage, "--params", str(work / "params.yaml")]
    if stage == "pretrain":
        args += ["--variant", "sista"]
    started = time.perf_counter()
    with log.open("ab") as output:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        memory = PeakMemory(process.pid)
        code = process.wait()
    peaks = memory.stop()
    seconds = time.perf_counter() - started
    if code:
        raise SystemExit(f"stage {stage} failed ({code}): see {log}")
    return {"seconds": seconds, "peak_memory_mb": peaks}


def measure(
    size: int,
    image_px: int,
    steps: int,
    server: S3Server,
    keep: Path | None,
    stages_run: tuple[str, ...] = STAGES,
) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"sista-scale-{size}-"))
    run = hashlib.sha1(f"{size}-{time.time()}".encode()).hexdigest()[:8]
    source = f"s3://sista/scale-{run}/mimic-cxr-jpg/2.0.0"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")},
        **server.env,
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(server.env)
    try:
        tick = time.perf_counter()
        written = write_mimic_layout(source, size, image_px)
        print(
            f"[scale] {size:,} images: {written['objects']:,} objects on S3 "
            f"({written['bytes'] / 1e6:.0f} MB) in {time.perf_counter() - tick:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        bench_params(work, source, f"s3://sista/scale-{run}/stages", steps)
        stages = {}
        for stage in stages_run:
            stages[stage] = run_stage(work, stage, env, work / "stages.log")
            print(
                f"[scale] {size:,}: {stage} {stages[stage]['seconds']:.0f} s, peak RSS "
                f"{max(p['rss'] for p in stages[stage]['peak_memory_mb'].values()):.0f} MB",
                file=sys.stderr,
                flush=True,
            )
        counts = json.loads((work / "data" / "ingest" / "_stage.json").read_text())
        return {"images": size, "source": written, "stages": stages, "ingest": counts.get("counts")}
    finally:
        if keep:
            shutil.copy(work / "stages.log", keep / f"scale-{size}.log")
        shutil.rmtree(work, ignore_errors=True)


def compare(small: dict, large: dict, steps: int, batch: int) -> list[dict[str, Any]]:
    """One row per (stage, process): figures at both sizes and large / small."""
    rows = []
    for stage in small["stages"]:
        a, b = small["stages"][stage], large["stages"][stage]
        done = {
            size: steps * batch if stage == "pretrain" else size
            for size in (small["images"], large["images"])
        }
        rows.append(
            {
                "stage": stage,
                "what": "images/s" if stage != "pretrain" else "samples/s (short epoch)",
                "small": done[small["images"]] / a["seconds"],
                "large": done[large["images"]] / b["seconds"],
                "small_s": a["seconds"],
                "large_s": b["seconds"],
            }
        )
        for name in sorted(set(a["peak_memory_mb"]) | set(b["peak_memory_mb"])):
            for kind, label in (("rss", "peak RSS MB"), ("private", "peak private MB")):
                low = a["peak_memory_mb"].get(name, {}).get(kind)
                high = b["peak_memory_mb"].get(name, {}).get(kind)
                rows.append(
                    {
                        "stage": stage,
                        "what": f"{label}: {name}",
                        "small": low,
                        "large": high,
                        "ray_internal": name in RAY_INTERNALS,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000", help="two image counts")
    parser.add_argument("--image-px", type=int, default=512)
    parser.add_argument("--pretrain-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument(
        "--stages", default=",".join(STAGES), help="the first stages to run (comma list)"
    )
    args = parser.parse_args(argv)
    stages_run = tuple(args.stages.split(","))
    if stages_run != STAGES[: len(stages_run)]:
        parser.error(f"--stages: a prefix of {','.join(STAGES)} (each reads the one before)")
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != 2:
        parser.error("--sizes takes two image counts")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    batch = yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain"]["optim"]["batch_size"]
    with S3Server(buckets=("sista",)) as server:
        results = [
            measure(n, args.image_px, args.pretrain_steps, server, args.out.parent, stages_run)
            for n in sizes
        ]
    rows = compare(*results, args.pretrain_steps, batch)
    report = {"sizes": sizes, "image_px": args.image_px, "runs": results, "rows": rows}
    args.out.write_text(json.dumps(report, indent=1))
    for row in rows:
        ratio = row["large"] / row["small"] if row["small"] and row["large"] else None
        print(
            f"{row['stage']:<11} {row['what']:<58} {row['small'] or 0:>9.1f} "
            f"{row['large'] or 0:>9.1f} " + (f"{ratio:>6.2f}x" if ratio else "     -")
        )
    return report


if __name__ == "__main__":
    main()
