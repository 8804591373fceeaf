"""The Tune trainable of one evaluation cell, in a module with light imports: trial
processes start faster when they do not import the whole evaluate stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from sista_core.probe import macro_auroc, standardise, train_linear_probe


def probe_cell(config: dict[str, Any]) -> None:
    """One linear probe on cached features (init, fraction, seed); reports test AUROC."""
    torch.set_num_threads(1)
    features = torch.from_numpy(np.load(Path(config["features_dir"]) / f"{config['init']}.npy"))
    labels = torch.from_numpy(np.load(config["labels_path"]))
    split = json.loads(Path(config["split_path"]).read_text())
    subset = split["subsets"][f"{config['fraction']:g}/{config['seed']}"]
    train, test = standardise(features[subset], features[split["test"]])
    probe = train_linear_probe(
        train,
        labels[subset],
        epochs=config["epochs"],
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        seed=config["seed"],
    )
    with torch.no_grad():
        auroc, per_label = macro_auroc(probe(test), labels[split["test"]])
    tune.report({"auroc": auroc, "per_label": per_label, "train_size": len(subset)})
