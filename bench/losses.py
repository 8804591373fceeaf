"""Loss benchmark: vectorised ``sta_loss`` / ``sia_loss`` vs a per-sample Python loop.

The loop is the way MGCA computes its token-level loss (one report at a time). Both compute
the same maths; the script checks losses and gradients agree to 1e-5 before timing them.

    python -m bench.losses                 # B=64, Nw=64, Np=196, d=128 and two more sizes
    python -m bench.losses --sizes 8,16,49 --repeats 2
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sista_core.cpu import retain_freed_memory
from sista_core.losses import sia_loss, sta_loss
from sista_core.losses.reference import sia_loss_per_row_loop, sta_loss_per_sample_loop


def _inputs(batch: int, num_words: int, num_patches: int, dim: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    words = torch.randn(batch, num_words, dim, generator=generator)
    patches = torch.randn(batch, num_patches, dim, generator=generator)
    lengths = torch.randint(num_words // 2, num_words + 1, (batch,), generator=generator)
    word_mask = torch.arange(num_words)[None] < lengths[:, None]
    return words, word_mask, patches


def _forward_backward(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def _max_difference(vectorised, loop, *tensors) -> float:
    """Largest absolute difference between the two implementations' losses and gradients."""
    loss_v, grads_v = _forward_backward(vectorised, *tensors)
    loss_l, grads_l = _forward_backward(loop, *tensors)
    return max(
        (loss_v - loss_l).abs().item(),
        *((gv - gl).abs().max().item() for gv, gl in zip(grads_v, grads_l, strict=True)),
    )


def best_seconds(fns, repeats: int) -> list[float]:
    """Fastest of ``repeats`` runs of each function after a warm-up: the least disturbed by
    other processes. The functions take turns, so a busy spell on a shared machine slows
    both sides of a ratio rather than one."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    # As timeit: no garbage collection inside the timings (the loop makes many more Python
    # objects, so a collection would land on its side more often).
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def bench_sta(batch, num_words, num_patches, dim, sparse, repeats) -> dict:
    words, word_mask, patches = _inputs(batch, num_words, num_patches, dim)

    def vectorised(w, p):
        return sta_loss(w, word_mask, p, sparse=sparse)

    def loop(w, p):
        return sta_loss_per_sample_loop(w, word_mask, p, sparse=sparse)

    max_diff = _max_difference(vectorised, loop, words, patches)
    t_vec, t_loop = best_seconds(
        [
            lambda: _forward_backward(vectorised, words, patches),
            lambda: _forward_backward(loop, words, patches),
        ],
        repeats,
    )
    return {
        "loss": "sta",
        "sparse": sparse,
        "B": batch,
        "Nw": num_words,
        "Np": num_patches,
        "d": dim,
        "vectorised_s": t_vec,
        "loop_s": t_loop,
        "speedup": t_loop / t_vec,
        "max_abs_diff": max_diff,
    }


def bench_sia(batch, dim, repeats) -> dict:
    generator = torch.Generator().manual_seed(0)
    img, txt = (
        torch.randn(batch, dim, generator=generator),
        torch.randn(batch, dim, generator=generator),
    )
    semantics = F.normalize(torch.randn(batch, 16, generator=generator).round(), dim=-1)
    report_sim = semantics @ semantics.T

    def vectorised(a, b):
        return sia_loss(a, b, report_sim, threshold=0.9)

    def loop(a, b):
        return sia_loss_per_row_loop(a, b, report_sim, threshold=0.9)

    max_diff = _max_difference(vectorised, loop, img, txt)
    t_vec, t_loop = best_seconds(
        [
            lambda: _forward_backward(vectorised, img, txt),
            lambda: _forward_backward(loop, img, txt),
        ],
        repeats,
    )
    return {
        "loss": "sia",
        "sparse": "-",
        "B": batch,
        "Nw": "-",
        "Np": "-",
        "d": dim,
        "vectorised_s": t_vec,
        "loop_s": t_loop,
        "speedup": t_loop / t_vec,
        "max_abs_diff": max_diff,
    }


def bench_sia_plus_sta(batch, num_words, num_patches, dim, repeats) -> dict:
    """The two losses of a training step together (SIA on the global embeddings, STA with
    sparsemax on the tokens): what a step pays, vectorised vs looped."""
    words, word_mask, patches = _inputs(batch, num_words, num_patches, dim)
    generator = torch.Generator().manual_seed(1)
    img, txt = (torch.randn(batch, dim, generator=generator) for _ in range(2))
    semantics = F.normalize(torch.randn(batch, 16, generator=generator).round(), dim=-1)
    report_sim = semantics @ semantics.T

    def vectorised(a, b, w, p):
        return sia_loss(a, b, report_sim, threshold=0.9) + sta_loss(w, word_mask, p)

    def loop(a, b, w, p):
        sia = sia_loss_per_row_loop(a, b, report_sim, threshold=0.9)
        return sia + sta_loss_per_sample_loop(w, word_mask, p)

    inputs = (img, txt, words, patches)
    max_diff = _max_difference(vectorised, loop, *inputs)
    t_vec, t_loop = best_seconds(
        [lambda: _forward_backward(vectorised, *inputs), lambda: _forward_backward(loop, *inputs)],
        repeats,
    )
    return {
        "loss": "sia+sta",
        "sparse": "sparsemax",
        "B": batch,
        "Nw": num_words,
        "Np": num_patches,
        "d": dim,
        "vectorised_s": t_vec,
        "loop_s": t_loop,
        "speedup": t_loop / t_vec,
        "max_abs_diff": max_diff,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", default="64,64,196;32,32,49;16,64,196", help="B,Nw,Np triples separated by ';'"
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/losses.json"))
    args = parser.parse_args(argv)

    # As in training (components/stages/pretrain.py), for both implementations alike.
    allocator_tuned = retain_freed_memory()
    torch.manual_seed(0)
    rows = []
    for triple in args.sizes.split(";"):
        batch, num_words, num_patches = (int(v) for v in triple.split(","))
        rows.append(bench_sia_plus_sta(batch, num_words, num_patches, args.dim, args.repeats))
        for sparse in ("sparsemax", "softmax"):
            rows.append(bench_sta(batch, num_words, num_patches, args.dim, sparse, args.repeats))
        rows.append(bench_sia(batch, args.dim, args.repeats))

    machine = platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}, "
        f"freed memory retained: {allocator_tuned}"
    )
    header = ("loss", "sparse", "B", "Nw", "Np", "vector ms", "loop ms", "speedup", "max|diff|")
    print("{:7} {:9} {:>4} {:>4} {:>4} {:>10} {:>9} {:>8} {:>10}".format(*header))
    for r in rows:
        print(
            f"{r['loss']:7} {r['sparse']:9} {r['B']:>4} {r['Nw']:>4} {r['Np']:>4} "
            f"{1e3 * r['vectorised_s']:>10.1f} {1e3 * r['loop_s']:>9.1f} "
            f"{r['speedup']:>7.1f}x {r['max_abs_diff']:>10.1e}"
        )
    worst = max(r["max_abs_diff"] for r in rows)
    if worst > 1e-5:
        raise SystemExit(f"vectorised and loop disagree by {worst:.2e} (> 1e-5)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, indent=2
        )
    )
    return rows


if __name__ == "__main__":
    main()
