"""Is the embedded downstream benchmark neither trivial nor hopeless?

Trains the default image encoder end to end (random init, fully supervised, 100 % of the
downstream training labels) and compares its test macro AUROC over the five CheXpert
competition findings with the random-init linear probe at 1 % labels from the evaluate stage.
Runs on the outputs of `make repro` (data/ingest, data/evaluate). Phantom images.

    python -m bench.phantom_difficulty [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from components.platform.config import load_params
from components.platform.shards import read_shard_images
from sista_core.encoders import ImageEncoder
from sista_core.findings import CHEXPERT_COMPETITION
from sista_core.probe import macro_auroc


def downstream_split(data: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [
        r
        for r in pq.read_table(data / "ingest" / "manifest.parquet").to_pylist()
        if r["dataset"] == "phantom_classification" and r["split"] == split
    ]
    images = read_shard_images(data / "ingest", rows)
    labels = np.array([[r[n] for n in CHEXPERT_COMPETITION] for r in rows], np.float32)
    return images, labels


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/phantom_difficulty.json"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    data = Path(params.storage.uri)
    torch.manual_seed(0)
    train_images, train_labels = downstream_split(data, "train")
    test_images, test_labels = downstream_split(data, "test")
    image = params.pretrain.image
    encoder = ImageEncoder(image.name, img_size=image.img_size)
    head = torch.nn.Linear(encoder.num_features, len(CHEXPERT_COMPETITION))
    model_params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(model_params, lr=1e-3, weight_decay=0.05)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_images))
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            logits = head(
                encoder(encoder.normalize(torch.from_numpy(train_images[batch])))["global"]
            )
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(train_labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}", flush=True)
    encoder.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                head(
                    encoder(encoder.normalize(torch.from_numpy(test_images[s : s + 256])))["global"]
                )
                for s in range(0, len(test_images), 256)
            ]
        )
    supervised, per_label = macro_auroc(logits, torch.from_numpy(test_labels))
    evaluation = json.loads((data / "evaluate" / "metrics.json").read_text())
    random_probe = evaluation["classification"]["auroc"]["random"]["0.01"]
    result = {
        "images": "phantom (synthetic)",
        "supervised_100pct_auroc": supervised,
        "supervised_per_label": dict(zip(CHEXPERT_COMPETITION, per_label, strict=True)),
        "random_init_probe_1pct_auroc": random_probe,
        "train_images": len(train_images),
        "test_images": len(test_images),
        "epochs": args.epochs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
