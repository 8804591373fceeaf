"""Similarity-cache benchmark: block-wise top-k time and peak memory, and MiniLM throughput.

Each N runs ``topk_neighbours`` (top-32) on random 384-d float16 L2-normalised vectors in a
fresh subprocess, so its peak resident memory (VmHWM) is its own. The dense N x N float32
matrix the block-wise code avoids is shown beside it. For N up to ``--compare-up-to`` the
non-symmetric variant (every block pair computed twice) runs too, to show what symmetry buys.
Then MiniLM (the frozen sentence encoder of the cache) encodes 2,000 real Open-I reports.

    python -m bench.similarity                          # N = 10k, 50k, 200k; 2,000 texts
    python -m bench.similarity --sizes 2000,8000 --texts 256
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import torch.nn.functional as F

DIM = 384


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _random_embeddings(num_reports: int, seed: int = 0) -> torch.Tensor:
    """(N, 384) float16 unit vectors, drawn in chunks so no float32 copy of N rows exists."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.empty(num_reports, DIM, dtype=torch.float16)
    for start in range(0, num_reports, 65536):
        chunk = torch.randn(min(65536, num_reports - start), DIM, generator=generator)
        embeddings[start : start + len(chunk)] = F.normalize(chunk, dim=-1).half()
    return embeddings


def child(num_reports: int, k: int, block_size: int, symmetric: bool) -> dict:
    """Run in a fresh process: time and peak memory of one ``topk_neighbours`` call."""
    from sista_core.similarity import similarity_statistics, topk_neighbours

    imports_kib = _status_kib("VmRSS")
    embeddings = _random_embeddings(num_reports)
    before_kib = _status_kib("VmRSS")
    try:  # reset the peak to the current RSS (Linux >= 4.0), so data generation is not in it
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    start, cpu_start = time.perf_counter(), time.process_time()
    indices, _ = topk_neighbours(embeddings, k, block_size=block_size, symmetric=symmetric)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert indices.shape == (num_reports, k) and int(indices.min()) >= 0
    peak_kib = _status_kib("VmHWM")
    start = time.perf_counter()
    stats = similarity_statistics(embeddings)  # exact up to 50k reports, sampled beyond
    stats_seconds = time.perf_counter() - start
    return {
        "N": num_reports,
        "k": k,
        "block_size": block_size,
        "symmetric": symmetric,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all threads; steadier than wall time on a shared machine
        "rss_after_imports_mb": imports_kib / 1024,
        "rss_before_topk_mb": before_kib / 1024,
        "peak_rss_mb": peak_kib / 1024,
        "topk_extra_mb": (peak_kib - before_kib) / 1024,
        "embeddings_mb": embeddings.numel() * 2 / 2**20,
        "topk_table_mb": num_reports * k * (8 + 4) / 2**20,
        "dense_float32_gb": num_reports**2 * 4 / 2**30,
        "statistics_seconds": stats_seconds,
        "statistics_method": stats["method"],
        "threads": torch.get_num_threads(),
    }


def run_child(num_reports: int, k: int, block_size: int, symmetric: bool) -> dict:
    command = [sys.executable, "-m", "bench.similarity", "--child", str(num_reports)]
    command += ["--k", str(k), "--block-size", str(block_size)]
    command += [] if symmetric else ["--no-symmetric"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child N={num_reports} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def openi_report_texts(limit: int) -> tuple[list[str], str]:
    """Findings + impression of the real Open-I reports shipped by torchxrayvision."""
    from sista_core.assets import OPENI_REPORTS, xrv_data_file

    texts = []
    with tarfile.open(xrv_data_file(OPENI_REPORTS)) as archive:
        for member in archive:
            if not member.name.endswith(".xml"):
                continue
            root = ET.parse(archive.extractfile(member)).getroot()
            sections = {
                node.get("Label"): (node.text or "").strip() for node in root.iter("AbstractText")
            }
            text = " ".join(sections.get(s, "") for s in ("FINDINGS", "IMPRESSION")).strip()
            if text:
                texts.append(text)
            if len(texts) == limit:
                break
    return texts, f"Open-I ({OPENI_REPORTS} from torchxrayvision)"


def bench_text_encoder(num_texts: int, batch_size: int) -> dict:
    """MiniLM texts/s over real reports, in file order and sorted by length (less padding)."""
    from sista_core.encoders import TextEncoder

    texts, source = openi_report_texts(num_texts)
    encoder = TextEncoder().eval()
    words = sum(len(t.split()) for t in texts) / len(texts)
    result = {"texts": len(texts), "source": source, "mean_words": words, "batch": batch_size}
    for order, ordered in (("file", texts), ("by_length", sorted(texts, key=len))):
        with torch.inference_mode():
            encoder.encode(ordered[:batch_size])  # warm-up
            start = time.perf_counter()
            for first in range(0, len(ordered), batch_size):
                encoder.encode(ordered[first : first + batch_size])["global"]
            seconds = time.perf_counter() - start
        result[f"{order}_texts_per_s"] = len(ordered) / seconds
    return result


def print_table(rows: list[dict], text: dict | None) -> None:
    machine = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {rows[0]['threads']} threads, {machine}")
    header = ("N", "symmetric", "top-k s", "cpu s", "peak RSS MB", "before MB", "extra MB")
    print(
        "{:>7} {:>9} {:>8} {:>7} {:>11} {:>9} {:>8} {:>13} {:>8}".format(
            *header, "dense NxN f32", "stats s"
        )
    )
    for r in rows:
        print(
            f"{r['N']:>7} {str(r['symmetric']):>9} {r['seconds']:>8.1f} {r['cpu_seconds']:>7.1f} "
            f"{r['peak_rss_mb']:>11.0f} {r['rss_before_topk_mb']:>9.0f} {r['topk_extra_mb']:>8.0f} "
            f"{r['dense_float32_gb']:>10.1f} GB {r['statistics_seconds']:>8.1f}"
            f" ({r['statistics_method'].split(':')[0]})"
        )
    print(f"(process RSS after imports alone: {rows[0]['rss_after_imports_mb']:.0f} MB)")
    if text:
        print(
            f"MiniLM: {text['texts']} {text['source']} reports, {text['mean_words']:.0f} words "
            f"on average, batch {text['batch']}: {text['file_texts_per_s']:.0f} texts/s in file "
            f"order, {text['by_length_texts_per_s']:.0f} texts/s sorted by length"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,50000,200000")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--compare-up-to", type=int, default=50_000)
    parser.add_argument("--texts", type=int, default=2000, help="0 skips the text encoder")
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/similarity.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-symmetric", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child, args.k, args.block_size, not args.no_symmetric)))
        return {}

    rows = []
    for num_reports in (int(n) for n in args.sizes.split(",")):
        rows.append(run_child(num_reports, args.k, args.block_size, symmetric=True))
        if num_reports <= args.compare_up_to:
            rows.append(run_child(num_reports, args.k, args.block_size, symmetric=False))
        print(f"N={num_reports}: done", file=sys.stderr)
    text = bench_text_encoder(args.texts, args.text_batch) if args.texts else None
    print_table(rows, text)
    result = {"torch": torch.__version__, "topk": rows, "text_encoder": text}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
