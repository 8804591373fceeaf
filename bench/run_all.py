"""Every benchmark in one run: ``bench/results.md`` and ``bench/results.json``.

Each figure stands beside a baseline measured in the same run (the two sides take turns
inside each benchmark), so the ratios hold on a shared or slower machine even where the
absolute times do not. The header names the machine and the library versions.

  - loss: SIA + STA forward+backward, vectorised vs a per-sample loop (``bench.losses``);
  - data loading: images/s from the uint8 shards vs decoding JPEGs every step, 1 and 2
    loader workers (``bench.data_loading``);
  - pre-training: samples/s with 1 vs 2 data-parallel workers and the time per step by
    phase (``bench.pretrain_scaling``);
  - similarity cache: block-wise top-k time and peak memory at N = 10k, 50k, 200k against
    the dense N x N matrix, and MiniLM throughput on 2,000 real reports (``bench.similarity``);
  - scale: ingest, reports, similarity and a short pre-training epoch at 2,000 and 20,000
    images of a MIMIC-CXR-JPG layout on S3, throughput and per-process peak RSS side by
    side (``bench.scale``, about 20 minutes);
  - end to end: per-stage wall time of the last ``dvc repro``, read from the stages'
    ``_stage.json`` (not re-run here: the pipeline takes longer than the whole benchmark).

    make bench                       # python -m bench.run_all
    python -m bench.run_all --only losses,data_loading
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import data_loading, gpu_pretrain, losses, pretrain_scaling, scale, similarity
from components.platform.stage import STAGES

RESULTS_DIR = Path("bench/results")  # each benchmark's own JSON, as when run alone
Section = dict[str, Any]  # title, columns, rows (cells), notes, data (raw rows), seconds


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def machine_info() -> dict[str, Any]:
    """CPU, cores, versions, date and commit: what a reader needs to compare two results."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in ("torch", "torchvision", "timm", "transformers", "ray", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "load_average_at_start": os.getloadavg()[0],
    }


def run_losses(quick: bool, out: Path) -> Section:
    sizes = "8,8,16" if quick else "64,64,196;16,32,49"
    rows = losses.main(["--sizes", sizes, "--repeats", "1" if quick else "5", "--out", str(out)])
    cells = [
        [
            " ".join([r["loss"].upper().replace("+", " + "), r["sparse"]]).rstrip(" -"),
            f"B={r['B']}" + (f", Nw={r['Nw']}, Np={r['Np']}" if r["loss"] != "sia" else ""),
            _ms(r["vectorised_s"]),
            _ms(r["loop_s"]),
            _ratio(r["speedup"]),
        ]
        for r in rows
    ]
    return {
        "title": "Loss: forward + backward, vectorised vs per-sample loop (MGCA's way)",
        "columns": ["loss", "size (d=128)", "vectorised", "loop (baseline)", "speedup"],
        "rows": cells,
        "notes": [
            "Both implementations agree to 1e-5 in loss and gradients (checked before timing). "
            "Best of the repeats, the two sides taking turns."
        ],
        "data": rows,
    }


def run_data_loading(quick: bool, out: Path) -> Section:
    argv = ["--images", "32", "--batch", "8", "--min-seconds", "0", "--repeats", "1"]
    argv = argv if quick else []
    rows = data_loading.main([*argv, "--out", str(out)])
    cells = [
        [
            str(r["workers"]),
            f"{r['shard_images_per_s']:.0f} img/s",
            f"{r['jpeg_images_per_s']:.1f} img/s",
            _ratio(r["speedup"]),
        ]
        for r in rows
    ]
    size, batch = rows[0]["image_size"], rows[0]["batch"]
    return {
        "title": f"Data loading: uint8 shards vs per-step JPEG decoding ({size} px, batch {batch})",
        "columns": ["loader workers", "shards", "JPEG decode (baseline)", "ratio"],
        "rows": cells,
        "notes": [
            "JPEGs: the 16 real radiographs of pneumonia-model-package at their original size "
            "(up to 1776x1416), repeated; both sides end in the same normalised float batch, "
            "built in the DataLoader workers."
        ],
        "data": rows,
    }


def _pretrain_explanation(rows: list[dict[str, Any]]) -> list[str]:
    """Why 2 workers on 2 cores are not twice as fast, in this run's numbers."""
    by_config = {r["config"]: r for r in rows}
    one, two = by_config.get("1x1"), by_config.get("2x1")
    if not one or not two:
        return []
    grown = {
        name: 1e3 * (two[f"{name}_s"] - one[f"{name}_s"])
        for name in pretrain_scaling.PHASES
        if abs(two[f"{name}_s"] - one[f"{name}_s"]) > 0.005
    }
    changes = ", ".join(f"{name} {delta:+.0f} ms" for name, delta in grown.items())
    return [
        f"Scaling efficiency of 2 workers = {two['efficiency']:.0%}: each worker's step takes "
        f"{1e3 * two['step_s']:.0f} ms against {1e3 * one['step_s']:.0f} ms alone"
        + (f" ({changes})" if changes else "")
        + ". With 2 workers backward includes DDP's gradient all-reduce (gloo, through "
        "memory) and loss includes gathering the other worker's embeddings for SIA; the two "
        "processes also share the memory bandwidth and caches, and any other load on the "
        "machine takes a core from one of them, stalling both at every all-reduce."
    ]


def _share(row: dict[str, Any], phase: str) -> float:
    """A phase's share of the step (the step itself: 100 %)."""
    return row[f"{phase}_s"] / row["step_s"]


def run_pretrain(quick: bool, out: Path) -> Section:
    argv = ["--steps", "1", "--warmup", "0", "--batch", "4", "--configs", "1x1,2x1"]
    rows = pretrain_scaling.main([*(argv if quick else []), "--out", str(out)])
    base = next(r for r in rows if r["config"] == "1x1")
    cells = [
        [
            f"{r['workers']} worker(s) x {r['threads_per_worker']} thread(s)",
            f"{r['samples_per_s']:.1f} samples/s",
            f"{base['samples_per_s']:.1f} samples/s",
            _ratio(r["speedup"]),
            f"{r['efficiency']:.0%}",
        ]
        for r in rows
    ]
    phases = [*pretrain_scaling.PHASES, "step"]
    breakdown = [
        [name, *(f"{1e3 * r[f'{name}_s']:.0f} ms" for r in rows), f"{_share(base, name):.0%}"]
        for name in phases
    ]
    return {
        "title": "Pre-training: samples/s, 1 vs 2 data-parallel workers (default profile model)",
        "columns": ["configuration", "samples/s", "1 x 1 (baseline)", "speedup", "per core"],
        "rows": cells,
        "extra_tables": [
            {
                "title": "Time per step by phase (rank 0, mean of the timed steps)",
                "columns": ["phase", *(r["config"] for r in rows), "share of 1x1 step"],
                "rows": breakdown,
            }
        ],
        "notes": [
            f"Per-worker batch {base['global_batch']}; the global batch grows with the workers "
            "as in Ray Train. The training step of components/stages/pretrain.py in plain "
            "processes (DDP, gloo), without Ray's start-up: see bench/pretrain_scaling.py.",
            *_pretrain_explanation(rows),
        ],
        "data": rows,
    }


def run_similarity(quick: bool, out: Path) -> Section:
    argv = ["--sizes", "300", "--texts", "0", "--compare-up-to", "0"]
    if not quick:
        argv = ["--compare-up-to", "10000"]  # both ways at 50k would add a minute
    result = similarity.main([*argv, "--out", str(out)])
    symmetric = {r["N"]: r for r in result["topk"] if r["symmetric"]}
    both_ways = {r["N"]: r for r in result["topk"] if not r["symmetric"]}
    cells = []
    for n, r in symmetric.items():
        dense_mb = r["dense_float32_gb"] * 1024
        extra_mb = max(r["topk_extra_mb"], 1.0)  # below a page count's resolution
        cells.append(
            [
                f"top-{r['k']}, N={n:,}",
                f"{r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(+{r['topk_extra_mb']:.0f} MB, {1e3 * r['topk_extra_mb'] / n:.1f} MB per 1k)",
                f"dense N x N float32: {dense_mb:,.0f} MB",
                f"{dense_mb / extra_mb:.3g}x less memory",
            ]
        )
        if n in both_ways:
            cells.append(
                [
                    f"symmetric blocks, N={n:,}",
                    f"{r['seconds']:.1f} s",
                    f"every block pair both ways: {both_ways[n]['seconds']:.1f} s",
                    _ratio(both_ways[n]["seconds"] / r["seconds"]),
                ]
            )
    text = result.get("text_encoder")
    if text:
        cells.append(
            [
                f"MiniLM, {text['texts']:,} real reports, batch {text['batch']}",
                f"{text['by_length_texts_per_s']:.0f} texts/s sorted by length",
                f"{text['file_texts_per_s']:.0f} texts/s in file order",
                _ratio(text["by_length_texts_per_s"] / text["file_texts_per_s"]),
            ]
        )
    return {
        "title": "Similarity cache: exact block-wise top-k (random 384-d float16) and MiniLM",
        "columns": ["what", "figure", "baseline", "ratio"],
        "rows": cells,
        "notes": [
            "Each N in a fresh process; +MB is the growth of peak RSS during top_k alone, "
            "on top of the embeddings (N x 384 float16): O(N k) lists plus one block. "
            f"Block size {result['topk'][0]['block_size']}, "
            f"{result['topk'][0]['threads']} threads."
        ],
        "data": result,
    }


def stage_times(data_root: Path) -> Section:
    """Per-stage wall time of the last pipeline run, from each stage's ``_stage.json``."""
    entries = []
    for stage in STAGES:
        # pretrain runs once per variant (sista and the baselines), each in its own folder
        variants = sorted((data_root / stage).glob("*/_stage.json")) if stage == "pretrain" else []
        manifests = variants or [data_root / stage / "_stage.json"]
        for manifest in manifests:
            name = stage if manifest.parent.name == stage else f"{stage}/{manifest.parent.name}"
            seconds, when = None, None
            if manifest.exists():
                seconds = json.loads(manifest.read_text()).get("seconds")
                when = dt.datetime.fromtimestamp(manifest.stat().st_mtime, dt.UTC)
            entries.append({"stage": name, "seconds": seconds, "finished": when})
    total = sum(e["seconds"] for e in entries if e["seconds"] is not None)
    cells = [
        [
            e["stage"],
            "not run" if e["seconds"] is None else f"{e['seconds']:.1f} s",
            f"{total:.1f} s" if total else "-",
            "-" if e["seconds"] is None or not total else f"{e['seconds'] / total:.0%}",
            e["finished"].strftime("%Y-%m-%d %H:%M UTC") if e["finished"] else "-",
        ]
        for e in entries
    ]
    for entry in entries:
        entry["finished"] = entry["finished"].isoformat() if entry["finished"] else None
    return {
        "title": f"End to end: per-stage wall time of the last pipeline run ({data_root}/)",
        "columns": ["stage", "wall time", "all stages (baseline)", "share", "finished"],
        "rows": cells,
        "notes": [
            "Read from the stages' _stage.json (field seconds), written by `make repro`; "
            "not re-run by `make bench`. Stages run one after another, so the sum is the "
            "pipeline's compute time, without DVC's own overhead."
        ],
        "data": entries,
    }


def run_scale(quick: bool, out: Path) -> Section:
    argv = ["--sizes", "100,300", "--pretrain-steps", "2"] if quick else []
    return scale_section(scale.main([*argv, "--out", str(out)]))


def scale_section(report: dict[str, Any]) -> Section:
    """The scale benchmark's table from its JSON (``bench/results/scale.json``)."""
    small, large = report["sizes"]
    cells = []
    internal = [
        row["large"] / row["small"]
        for row in report["rows"]
        if row.get("ray_internal") and row["small"] and row["large"]
    ]
    for row in (r for r in report["rows"] if not r.get("ray_internal")):
        low, high = row["small"], row["large"]
        cells.append(
            [
                row["stage"],
                row["what"],
                "-" if low is None else f"{low:,.1f}",
                "-" if high is None else f"{high:,.1f}",
                _ratio(high / low if low and high else None),
            ]
        )
    return {
        "title": f"Scale: ingest to a short pre-training epoch at {small:,} and {large:,} images",
        "columns": [
            "stage",
            "figure",
            f"{small:,} images (baseline)",
            f"{large:,} images",
            "ratio",
        ],
        "rows": cells,
        "notes": [
            f"A MIMIC-CXR-JPG layout on moto's S3 server: PHANTOM JPEGs at {report['image_px']} px "
            "(64 distinct pictures, one file per image), real Open-I reports, the official "
            "tables; stage folders on S3 too. Each stage as `python -m pipeline.launch STAGE`; "
            "peak RSS is each process's VmHWM (the largest process of each kind; it counts "
            "the shared pages a process maps too: Ray's object store, memory-mapped files), "
            "peak private its largest RssAnon. Memory should keep a ratio near 1 while "
            "throughput holds (bench/scale.py).",
            f"Ray's own processes (daemons, agents, bookkeeping actors): largest ratio "
            f"{max(internal, default=1.0):.2f}x.",
        ],
        "data": report,
    }


def gpu_section(quick: bool, out: Path) -> Section:
    """ViT-B/16 224 px pre-training samples/s on a GPU (fp32 vs the GPU path), where this
    machine has one; otherwise a note saying how to run it where one is."""
    title = "Pre-training on a GPU: ViT-B/16 at 224 px, fp32 vs bf16 + channels-last (+ compile)"
    if not torch.cuda.is_available():
        return {
            "title": title,
            "columns": ["configuration", "samples/s", "fp32 (baseline)", "speedup"],
            "rows": [["not measured: no GPU in this run", "-", "-", "-"]],
            "notes": [
                "Prepared for a GPU machine: `python -m bench.gpu_pretrain` (batch 64, 5 "
                "warm-up + 20 timed steps per configuration, a few minutes)."
            ],
            "data": [],
        }
    quick_argv = ["--steps", "3", "--warmup", "1"] if quick else []
    rows = gpu_pretrain.main([*quick_argv, "--out", str(out)])
    baseline = rows[0]["samples_per_s"]
    return {
        "title": title,
        "columns": ["configuration", "samples/s", "fp32 (baseline)", "speedup", "peak memory"],
        "rows": [
            [
                r["configuration"],
                f"{r['samples_per_s']:.1f}",
                f"{baseline:.1f}",
                _ratio(r["speedup"]),
                f"{r['peak_memory_gb']:.1f} GB",
            ]
            for r in rows
        ],
        "notes": [f"Device: {torch.cuda.get_device_name()}; batch 64, synthetic pairs."],
        "data": rows,
    }


BENCHMARKS: dict[str, Callable[[bool, Path], Section]] = {
    "losses": run_losses,
    "data_loading": run_data_loading,
    "pretrain_scaling": run_pretrain,
    "similarity": run_similarity,
    "gpu": gpu_section,
    "scale": run_scale,
}


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(info: dict[str, Any], sections: dict[str, Section]) -> str:
    """results.md: the machine, then one table per benchmark (figure, baseline, ratio)."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        "# SISTA benchmarks",
        "",
        f"- machine: {info['cpu']}, {info['usable_cores']} usable cores "
        f"({info['logical_cores']} logical), torch threads {info['torch_threads']}, "
        f"load average {info['load_average_at_start']:.1f} at start",
        f"- versions: Python {info['python']}, {versions}",
        f"- date: {info['date']}, commit {info['commit']}, `make bench` wall time "
        f"{info.get('wall_seconds', 0):.0f} s",
        "- every ratio compares two figures measured in the same run (taking turns), so it "
        "holds on a shared machine where absolute times vary; the images of the default "
        "pipeline are synthetic phantoms, the reports real (Open-I).",
    ]
    for section in sections.values():
        lines += ["", f"## {section['title']}", ""]
        lines += markdown_table(section["columns"], section["rows"])
        for extra in section.get("extra_tables", []):
            lines += ["", f"{extra['title']}:", ""]
            lines += markdown_table(extra["columns"], extra["rows"])
        lines += [""] + [f"{note}" for note in section.get("notes", [])]
        if "seconds" in section:
            lines += ["", f"_(benchmark wall time {section['seconds']:.0f} s)_"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--out-dir", type=Path, default=Path("bench"))
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="per benchmark")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    info = machine_info()
    chosen = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmarks {sorted(unknown)}; known: {list(BENCHMARKS)}")
    sections: dict[str, Section] = {}
    for name in chosen:
        print(f"== {name}", file=sys.stderr, flush=True)
        tick = time.perf_counter()
        sections[name] = BENCHMARKS[name](args.quick, args.results_dir / f"{name}.json")
        sections[name]["seconds"] = time.perf_counter() - tick
    sections["end_to_end"] = stage_times(args.data_root)
    info["wall_seconds"] = time.perf_counter() - started

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(render_markdown(info, sections))
    results = {
        "machine": info,
        "benchmarks": {
            name: {k: v for k, v in s.items() if k not in ("columns", "rows", "extra_tables")}
            for name, s in sections.items()
        },
    }
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out_dir}/results.md and results.json in {info['wall_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
