"""The sweep's validation signal reads the label subsets and the validation split only: the
test split, which evaluate scores, never informs the choice of hyper-parameters."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import components.stages.sweep_signal as sweep_signal
from components.platform.shards import subset_file_name
from components.stages.sweep_signal import ValidationSignal

SET = "phantom_classification"
SPLITS = ["train"] * 16 + ["val"] * 8 + ["test"] * 8


class MeanPooling(torch.nn.Module):
    """A stand-in image encoder: the global feature is the mean of each 2 x 2 block."""

    def normalize(self, pixels):
        return pixels.float() / 255

    def forward(self, pixels):
        return {"global": torch.nn.functional.avg_pool2d(pixels[:, None], 2).flatten(1)}


class StandInModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = MeanPooling()


def write_ingest(root, poison_test: bool) -> None:
    """A classification set of 32 records whose first label is "the top-left block is
    bright"; ``poison_test`` replaces every test image with noise and its labels with NaN."""
    ingest = root / "ingest"
    (ingest / "shards").mkdir(parents=True)
    (ingest / "subsets").mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 120, (len(SPLITS), 4, 4), dtype=np.uint8)
    bright = rng.permutation(len(SPLITS)) % 2 == 0
    images[bright, :2, :2] += 130
    labels = np.stack([bright, rng.random(len(SPLITS)) < 0.5], 1).astype(float)
    test = np.array(SPLITS) == "test"
    if poison_test:
        images[test] = rng.integers(0, 256, (int(test.sum()), 4, 4), dtype=np.uint8)
        labels[test] = np.nan
    np.save(ingest / "shards" / f"{SET}-00000.npy", images)
    rows = [
        {
            "record_id": f"{SET}-{n:02d}",
            "dataset": SET,
            "split": split,
            "shard": f"{SET}-00000.npy",
            "index": n,
            "labels": labels[n].tolist(),
        }
        for n, split in enumerate(SPLITS)
    ]
    pq.write_table(pa.Table.from_pylist(rows), ingest / "manifest.parquet")
    (ingest / "sets.json").write_text(json.dumps({SET: {"single_label": False}}))
    for seed in (0, 1):
        for fraction, size in ((0.5, 8), (1.0, 16)):
            chosen = np.random.default_rng(seed).permutation(16)[:size]
            ids = sorted(f"{SET}-{n:02d}" for n in chosen)
            (ingest / "subsets" / subset_file_name(fraction, seed, SET)).write_text(
                "\n".join(ids) + "\n"
            )


def signal(root) -> dict[str, float]:
    probe = {"epochs": 30, "lr": 0.05, "weight_decay": 0.0}
    validation = ValidationSignal(
        str(root), dataset=SET, fractions=(0.5, 1.0), seeds=(0, 1), probe=probe
    )
    return validation(StandInModel())


def test_the_signal_is_blind_to_the_test_split(tmp_path):
    write_ingest(tmp_path / "clean", poison_test=False)
    write_ingest(tmp_path / "poisoned", poison_test=True)
    clean, poisoned = signal(tmp_path / "clean"), signal(tmp_path / "poisoned")
    assert clean == poisoned
    assert set(clean) >= {"val_probe_auroc", "val_probe_auroc_at_0.5", "val_probe_auroc_at_1"}
    assert 0.5 < clean["val_probe_auroc"] <= 1.0  # the probes learned the bright-block label


def test_the_signal_reads_no_test_record(tmp_path, monkeypatch):
    write_ingest(tmp_path, poison_test=False)
    read = []

    def reading(ingest, rows):
        read.extend(row["record_id"] for row in rows)
        return original(ingest, rows)

    original = sweep_signal.read_shard_images
    monkeypatch.setattr(sweep_signal, "read_shard_images", reading)
    signal(tmp_path)
    splits = {f"{SET}-{n:02d}": split for n, split in enumerate(SPLITS)}
    assert {splits[record] for record in read} == {"train", "val"}
    assert sorted(r for r in read if splits[r] == "val") == [
        f"{SET}-{n:02d}" for n in range(16, 24)
    ]
