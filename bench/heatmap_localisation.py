"""Do a checkpoint's word heat maps point at the findings they name?

Renders phantom films with one focal finding each (pneumothorax, nodule, mass,
consolidation, opacity), writes a one-line report naming it, and counts how often the naming
word's STA attention puts more mass inside the finding's ground-truth mask than a uniform map
would (``sista_core.explain.localisation_rate``). Phantom images.

    python -m bench.heatmap_localisation --model data/pretrain/sista/model --n 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sista_core import SISTAModel
from sista_core.explain import localisation_rate


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("data/pretrain/sista/model"))
    parser.add_argument("--n", type=int, default=200, help="phantom images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="render size (default: model's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/heatmap_localisation.json"))
    args = parser.parse_args(argv)
    model = SISTAModel.from_pretrained(args.model)
    started = time.perf_counter()
    result = {
        "images": "phantom (synthetic)",
        "model": str(args.model),
        "seed": args.seed,
        **localisation_rate(model, args.n, args.seed, args.size),
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
