"""The paired bootstrap over test images (components/stages/paired_bootstrap.py): its metrics on a
resample against sklearn on the resampled arrays, the pairing, the table evaluate writes and
publish renders, and the cells' saved outputs reproducing their own scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from components.stages.paired_bootstrap import (
    NotComparable,
    ablation,
    bootstrap_weights,
    cell_outputs_path,
    counts_of,
    difference_interval,
    gate_difference,
    paired_bootstrap,
    resample_indices,
    resampled_accuracy,
    resampled_auroc,
    resampled_macro_auroc,
    resampled_mean,
    save_gate_outputs,
)
from components.stages.publish import ablation_markdown

# Scores with ties (0.4 twice across the classes, 0.9 twice), as a probe's logits can have.
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.9, 0.2, 0.65, 0.5, 0.3, 0.7])
TARGETS = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 0, 1])


def macro_auroc_by_sklearn(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the labels with both classes of sklearn's AUROC: the reference."""
    defined = [c for c in range(labels.shape[1]) if len(set(labels[:, c])) == 2]
    return float(np.mean([roc_auc_score(labels[:, c], logits[:, c]) for c in defined]))


def test_the_auroc_of_a_resample_is_sklearns_on_the_resampled_images():
    indices = resample_indices(len(SCORES), 50, seed=3)
    found = resampled_auroc(SCORES, TARGETS, counts_of(indices, len(SCORES)))
    for row, drawn in enumerate(indices):
        if len(set(TARGETS[drawn])) == 2:
            assert found[row] == pytest.approx(roc_auc_score(TARGETS[drawn], SCORES[drawn]))
        else:
            assert np.isnan(found[row])
    observed = resampled_auroc(SCORES, TARGETS, bootstrap_weights(len(SCORES), 5, seed=3))[0]
    assert observed == pytest.approx(roc_auc_score(TARGETS, SCORES))


def test_macro_auroc_skips_the_labels_a_resample_draws_with_one_class():
    rng = np.random.default_rng(0)
    labels = np.stack([TARGETS, np.eye(len(TARGETS))[4]], 1)  # label 1: a single positive
    logits = rng.normal(size=labels.shape) + labels
    indices = resample_indices(len(labels), 40, seed=1)
    found = resampled_macro_auroc(logits, labels, counts_of(indices, len(labels)))
    skipped = 0
    for row, drawn in enumerate(indices):
        skipped += labels[drawn, 1].max() == 0
        expected = macro_auroc_by_sklearn(logits[drawn], labels[drawn])
        assert found[row] == pytest.approx(expected)
    assert 0 < skipped < len(indices)  # both cases occur


def test_accuracy_and_mean_of_a_resample_are_those_of_the_resampled_images():
    rng = np.random.default_rng(2)
    logits, classes = rng.normal(size=(12, 3)), rng.integers(0, 3, 12)
    per_image = rng.random(12)
    per_image[[1, 5]] = np.nan  # images the Dice leaves out
    indices = resample_indices(12, 20, seed=0)
    weights = counts_of(indices, 12)
    accuracy = resampled_accuracy(logits, np.eye(3)[classes], weights)
    mean = resampled_mean(per_image, weights)
    for row, drawn in enumerate(indices):
        assert accuracy[row] == pytest.approx(np.mean(logits[drawn].argmax(1) == classes[drawn]))
        assert mean[row] == pytest.approx(np.nanmean(per_image[drawn]))


def auroc_metric(labels):
    return lambda logits, weights: resampled_macro_auroc(logits, labels, weights)


def test_a_clearly_better_init_has_an_interval_above_zero_and_sklearns_difference():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, 3)) < 0.4).astype(float)
    better = [labels * 2 + rng.normal(size=labels.shape) for _ in range(3)]  # per seed
    worse = [labels * 0.3 + rng.normal(size=labels.shape) for _ in range(3)]
    found = paired_bootstrap(auroc_metric(labels), better, worse, samples=300, seed=0)
    expected = np.mean(
        [
            macro_auroc_by_sklearn(b, labels) - macro_auroc_by_sklearn(w, labels)
            for b, w in zip(better, worse, strict=True)
        ]
    )
    assert found.mean == pytest.approx(expected)
    assert 0 < found.low < found.mean < found.high and found.beyond_noise
    assert found.resamples == 300
    reverse = paired_bootstrap(auroc_metric(labels), worse, better, samples=300, seed=0)
    assert reverse.high < 0 and reverse.beyond_noise
    assert (reverse.low, reverse.high) == pytest.approx((-found.high, -found.low))


def test_identical_inits_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 2)) < 0.5).astype(float)
    logits = [rng.normal(size=labels.shape) for _ in range(3)]
    found = paired_bootstrap(auroc_metric(labels), logits, [x.copy() for x in logits])
    assert (found.mean, found.low, found.high) == (0.0, 0.0, 0.0)
    assert not found.beyond_noise


def dice_metric(per_image, weights):
    return resampled_mean(per_image, weights)


def test_pairing_cancels_what_both_inits_share():
    """Per-image Dice that varies a lot between images, one init 0.01 above the other on
    every image: paired, every resample differs by 0.01; resampled independently, the
    images' spread swamps it."""
    rng = np.random.default_rng(0)
    reference = rng.random(300)
    init = reference + 0.01
    paired = paired_bootstrap(dice_metric, [init], [reference], samples=500, seed=0)
    assert (paired.mean, paired.low, paired.high) == pytest.approx((0.01, 0.01, 0.01))
    assert paired.beyond_noise
    weights = bootstrap_weights(300, 500, seed=0)
    unpaired_weights = bootstrap_weights(300, 500, seed=1)
    unpaired = difference_interval(
        dice_metric(init, weights)[None], dice_metric(reference, unpaired_weights)[None]
    )
    assert unpaired.low < 0 < unpaired.high and not unpaired.beyond_noise
    assert unpaired.high - unpaired.low > 0.05


def test_every_seed_uses_the_same_resamples():
    """Seed 0: the init 0.1 above on every image; seed 1: 0.1 below. With the same resample
    for both seeds the mean over seeds is 0 on every resample."""
    rng = np.random.default_rng(0)
    first, second = rng.random(100), rng.random(100)
    found = paired_bootstrap(
        dice_metric, [first + 0.1, second], [first, second + 0.1], samples=200, seed=0
    )
    assert (found.mean, found.low, found.high) == pytest.approx((0, 0, 0), abs=1e-12)


def test_the_interval_skips_resamples_where_the_metric_is_undefined():
    """A Dice over 2 scored images of 40: some resamples draw neither."""
    reference = np.full(40, np.nan)
    reference[[3, 17]] = [0.2, 0.6]
    found = paired_bootstrap(dice_metric, [reference + 0.05], [reference], samples=200, seed=0)
    assert 0 < found.resamples < 200
    assert (found.mean, found.low, found.high) == pytest.approx((0.05, 0.05, 0.05))


# --- the table: a work folder as the evaluate stage leaves it after its cells ---

SETS = {
    "findings": {"images": "phantom", "single_label": False},
    "classes": {"images": "real", "single_label": True},
    "masks": {"images": "phantom", "single_label": False},
    "boxes": {"images": "phantom", "single_label": False},
}
TEST = list(range(10, 90))  # 80 test images after 10 training rows
INITS = ("sista", "sia_soft", "intra_off")  # any names pretrain.baselines may add
FRACTIONS, SEEDS = (0.1, 1.0), (0, 1, 2)


def outputs_of(task, init, seed, truth):
    """sia_soft: clearly better than sista on the same images; any other init: exactly
    sista's outputs."""
    rng = np.random.default_rng(seed)
    if task == "segmentation":
        dice = rng.random(len(TEST)) * 0.5 + (0.3 if init == "sia_soft" else 0.0)
        dice[::4] = np.nan  # images without the finding
        return {"per_image_dice": dice}
    strength = 3.0 if init == "sia_soft" else 0.5
    return {"logits": truth * strength + rng.normal(size=truth.shape)}


@pytest.fixture
def work(tmp_path):
    rng = np.random.default_rng(0)
    labels = {
        "findings": (rng.random((90, 3)) < 0.4).astype(np.float32),
        "classes": np.eye(3, dtype=np.float32)[rng.integers(0, 3, 90)],
    }
    cells = []
    for dataset, task in [
        ("findings", "classification"),
        ("classes", "classification"),
        ("masks", "segmentation"),
        ("boxes", "detection"),
    ]:
        (tmp_path / f"{dataset}.split.json").write_text(json.dumps({"test": TEST}))
        truth = labels.get(dataset, np.zeros((90, 1)))[TEST]
        if dataset in labels:
            np.save(tmp_path / f"{dataset}.labels.npy", labels[dataset])
        for fraction in FRACTIONS:
            for seed in SEEDS:
                for init in INITS:
                    cell = {"task": task, "set": dataset, "init": init, "fraction": fraction}
                    cells.append({**cell, "seed": seed})
                    if task == "detection":
                        continue  # a detection cell saves no outputs: mAP is not resampled
                    path = cell_outputs_path(tmp_path, task, dataset, init, fraction, seed)
                    saved = outputs_of(task, init, seed, truth)
                    np.savez(path, test_index=np.array(TEST), **saved)
    return tmp_path, cells


def test_the_table_has_a_row_per_task_set_fraction_and_other_init(work):
    folder, cells = work
    found = ablation(cells, SETS, folder, samples=200)
    assert found["reference"] == "sista" and found["samples"] == 200
    rows = {(r["task"], r["set"], r["fraction"], r["init"]): r for r in found["rows"]}
    assert set(rows) == {
        (task, dataset, fraction, init)
        for task, dataset in [
            ("classification", "findings"),
            ("classification", "classes"),
            ("segmentation", "masks"),
        ]
        for fraction in ("0.1", "1")
        for init in ("sia_soft", "intra_off")
    }
    metrics = {(r["set"], r["metric"]) for r in found["rows"]}
    assert metrics == {("findings", "auroc"), ("classes", "accuracy"), ("masks", "dice")}
    for key, row in rows.items():
        assert row["seeds"] == 3 and row["test_images"] == 80 and row["resamples"] == 200
        if key[3] == "intra_off":
            assert (row["difference"], row["low"], row["high"]) == (0.0, 0.0, 0.0)
            assert not row["beyond_noise"]
        else:
            assert row["low"] > 0 and row["beyond_noise"]
    assert rows[("segmentation", "masks", "1", "sia_soft")]["difference"] == pytest.approx(0.3)
    assert [(o["task"], o["set"]) for o in found["left_out"]] == [("detection", "boxes")]
    json.dumps(found)  # what evaluate writes


def test_the_table_needs_the_same_seeds_and_test_images_for_both_inits(work):
    folder, cells = work
    classification = [c for c in cells if c["set"] == "findings"]
    without_a_seed = [c for c in classification if (c["init"], c["seed"]) != ("sia_soft", 2)]
    with pytest.raises(ValueError, match="sia_soft has seeds"):
        ablation(without_a_seed, SETS, folder, samples=10)
    path = cell_outputs_path(folder, "classification", "findings", "sia_soft", 1.0, 0)
    np.savez(path, test_index=np.array(TEST[::-1]), logits=np.zeros((80, 3)))
    with pytest.raises(ValueError, match="other images than the test split"):
        ablation(classification, SETS, folder, samples=10)


def test_no_reference_no_rows(work):
    folder, cells = work
    found = ablation([c for c in cells if c["init"] != "sista"], SETS, folder, samples=10)
    assert found["rows"] == [] and found["left_out"] == []


def test_publish_renders_the_table_with_its_marks(work):
    folder, cells = work
    found = ablation(cells, SETS, folder, samples=200)
    found["rows"][0].update(difference=-0.02, low=-0.03, high=-0.01)  # one below SISTA
    table = ablation_markdown(found)
    lines = table.splitlines()
    assert "| task · set | metric | labels | init | init − sista | 95 % interval |" in table
    first = next(line for line in lines if line.startswith("| classification · findings"))
    assert first == (
        "| classification · findings (PHANTOM images) | macro AUROC | 10 % | intra_off "
        "| -0.020 | [-0.030, -0.010] | ▼ beyond noise |"
    )
    same = [line for line in lines if "| intra_off |" in line][1:]
    assert same and all(
        line.endswith("| +0.000 | [+0.000, +0.000] | within noise |") for line in same
    )
    better = [line for line in lines if "| sia_soft |" in line]
    assert len(better) == 6 and all(line.endswith("| ▲ beyond noise |") for line in better)
    assert "| classification · classes (real images) | accuracy | 100 % | sia_soft |" in table
    assert "Not bootstrapped: detection · boxes (mAP is not resampled" in table
    assert "200 resamples of the test images" in table


def test_an_undefined_difference_reads_undefined():
    table = ablation_markdown(
        {
            "reference": "sista",
            "samples": 10,
            "seed": 0,
            "interval_percentiles": [2.5, 97.5],
            "rows": [
                {"task": "segmentation", "set": "s", "images": "real", "metric": "dice",
                 "fraction": "0.01", "init": "dense", "difference": float("nan"),
                 "low": float("nan"), "high": float("nan")}
            ],
            "left_out": [],
        }
    )  # fmt: skip
    assert "| undefined | [undefined, undefined] | undefined |" in table


# --- the cells save outputs that reproduce their own scores ---


def cell_config(task, dataset, single_label=False):
    return {
        "task": task,
        "set": dataset,
        "single_label": single_label,
        "init": "random",
        "fraction": 1.0,
        "seed": 0,
        "examples_cell": [1.0, 0],
        "probe_epochs": 100,
        "probe_lr": 0.1,
        "probe_weight_decay": 0.0,
        "head_steps": 1,
        "head_lr": 1e-3,
        "head_batch_size": 4,
        "head_width": 8,
        "finetune": False,
    }


def test_a_probe_cell_saves_the_test_logits_its_auroc_and_accuracy_come_from(tmp_path):
    from components.stages.evaluation_cells import classification_cell, features_path

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 4)).astype(np.float32)
    labels = (features[:, :2] + rng.normal(size=(40, 2)) > 0).astype(np.float32)
    split = {"test": list(range(20, 40)), "val": [], "subsets": {"1/0": list(range(20))}}
    (tmp_path / "findings.split.json").write_text(json.dumps(split))
    np.save(features_path(tmp_path, "random", "findings", "global"), features)
    np.save(tmp_path / "findings.labels.npy", labels)
    result = classification_cell(cell_config("classification", "findings"), tmp_path, split)
    saved = np.load(cell_outputs_path(tmp_path, "classification", "findings", "random", 1.0, 0))
    assert saved["test_index"].tolist() == split["test"] and saved["logits"].shape == (20, 2)
    observed = resampled_macro_auroc(saved["logits"], labels[20:], np.ones((1, 20)))[0]
    assert observed == pytest.approx(result["auroc"])
    assert observed == pytest.approx(macro_auroc_by_sklearn(saved["logits"], labels[20:]))

    classes = np.eye(2, dtype=np.float32)[(features[:, 0] > 0).astype(int)]
    np.save(features_path(tmp_path, "random", "classes", "global"), features)
    np.save(tmp_path / "classes.labels.npy", classes)
    cell = cell_config("classification", "classes", single_label=True)
    result = classification_cell(cell, tmp_path, split)
    saved = np.load(cell_outputs_path(tmp_path, "classification", "classes", "random", 1.0, 0))
    observed = resampled_accuracy(saved["logits"], classes[20:], np.ones((1, 20)))[0]
    assert observed == pytest.approx(result["accuracy"])


def test_a_segmentation_cell_saves_the_dice_of_each_test_image_it_scores(tmp_path, monkeypatch):
    """A stand-in head whose probabilities are the cached pyramid (as in
    test_evaluation_cells): the cell's own Dice against the mean of what it saved."""
    import components.stages.evaluation_cells as cells

    monkeypatch.setattr(cells, "train_segmenter", lambda pyramid, masks, **options: "head")
    monkeypatch.setattr(
        cells, "predict_probabilities", lambda head, pyramid, batch_size: pyramid[0][:, 0]
    )
    masks = np.zeros((8, 8, 8), bool)
    masks[:, :4, :4] = True
    masks[6] = False  # a test image without the finding: not scored
    predicted = np.zeros((8, 8, 8), bool)
    predicted[:, :2, :4] = True  # half the mask: Dice 2/3
    predicted[5] = masks[5]  # Dice 1
    split = {"test": [4, 5, 6, 7], "val": [], "subsets": {"1/0": [0, 1, 2, 3]}}
    (tmp_path / "findings.split.json").write_text(json.dumps(split))
    np.save(tmp_path / "findings.masks.npy", masks)
    pyramid = cells.features_path(tmp_path, "random", "findings", "pyramid")
    np.savez(pyramid, level_0=predicted[:, None].astype(np.float16))
    result = cells.segmentation_cell(cell_config("segmentation", "findings"), tmp_path, split)
    saved = np.load(cell_outputs_path(tmp_path, "segmentation", "findings", "random", 1.0, 0))
    per_image = saved["per_image_dice"]
    assert np.isnan(per_image[2]) and per_image[[0, 1, 3]] == pytest.approx([2 / 3, 1, 2 / 3])
    assert resampled_mean(per_image, np.ones((1, 4)))[0] == pytest.approx(result["dice"])


# --- the promotion gate's outputs: SISTA's test outputs kept for the next candidate ---


def test_the_gate_outputs_pair_with_a_champions_in_any_order_as_sklearn_scores_them(work):
    folder, _ = work
    split = json.loads((folder / "findings.split.json").read_text())
    record_ids = [f"study{i:03d}" for i in range(90)]
    (folder / "findings.split.json").write_text(json.dumps({**split, "record_ids": record_ids}))
    gate = ("classification", "findings", "auroc", 1.0)
    save_gate_outputs(folder / "candidate.npz", folder, gate, SEEDS)
    labels = np.load(folder / "findings.labels.npy")[TEST]
    with np.load(folder / "candidate.npz") as saved:
        logits = [f"logits.{s}" for s in SEEDS]
        assert sorted(saved.files) == sorted(["metric", "test_ids", "seeds", "labels", *logits])
        assert saved["test_ids"].tolist() == [record_ids[i] for i in TEST]
        assert str(saved["metric"]) == "auroc" and saved["seeds"].tolist() == list(SEEDS)
        np.testing.assert_array_equal(saved["labels"], labels)
        ours = {s: saved[f"logits.{s}"] for s in SEEDS}
    for seed in SEEDS:
        cell = cell_outputs_path(folder, "classification", "findings", "sista", 1.0, seed)
        np.testing.assert_array_equal(ours[seed], np.load(cell)["logits"])
    # The champion: the clearly better sia_soft outputs, saved in reverse image order.
    theirs = {s: outputs_of("classification", "sia_soft", s, labels)["logits"] for s in SEEDS}
    reverse = slice(None, None, -1)
    champion = {f"logits.{s}": theirs[s][reverse] for s in SEEDS}
    test_ids = np.array([record_ids[i] for i in TEST][reverse])
    np.savez(
        folder / "champion.npz",
        metric=np.array("auroc"),
        test_ids=test_ids,
        seeds=np.array(SEEDS),
        **champion,
    )
    found, paired = gate_difference(folder / "candidate.npz", folder / "champion.npz", 300)
    expected = np.mean(
        [
            macro_auroc_by_sklearn(ours[s], labels) - macro_auroc_by_sklearn(theirs[s], labels)
            for s in SEEDS
        ]
    )
    assert found.mean == pytest.approx(expected, abs=1e-9)
    assert found.high < 0 and found.resamples == 300
    assert paired == {"metric": "auroc", "test_images": 80, "seeds": [0, 1, 2], "samples": 300}
    same, _ = gate_difference(folder / "candidate.npz", folder / "candidate.npz", 50)
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    # Seeded: the same resamples, so the same interval, every time.
    assert gate_difference(folder / "candidate.npz", folder / "champion.npz", 300)[0] == found


def test_gate_outputs_of_a_segmentation_cell_pair_their_per_image_dice(tmp_path):
    """Dice: the mean over the images with the finding (NaN elsewhere) of the candidate's
    per-image Dice minus the champion's, per seed, then over the seeds."""
    ids = np.array([f"img{i}" for i in range(40)])
    rng = np.random.default_rng(0)
    ours = {s: rng.random(40) * 0.5 + 0.4 for s in (0, 1)}
    theirs = {s: rng.random(40) * 0.5 for s in (0, 1)}
    for dice in [*ours.values(), *theirs.values()]:
        dice[::5] = np.nan  # the images without the finding
    common = {"metric": np.array("dice"), "seeds": np.array([0, 1])}
    np.savez(
        tmp_path / "a.npz", test_ids=ids, **common, **{f"per_image_dice.{s}": ours[s] for s in ours}
    )
    np.savez(
        tmp_path / "b.npz",
        test_ids=ids[::-1],
        **common,
        **{f"per_image_dice.{s}": theirs[s][::-1] for s in theirs},
    )
    found, paired = gate_difference(tmp_path / "a.npz", tmp_path / "b.npz", 200)
    expected = np.mean([np.nanmean(ours[s]) - np.nanmean(theirs[s]) for s in (0, 1)])
    assert found.mean == pytest.approx(expected) and found.low > 0
    assert paired == {"metric": "dice", "test_images": 40, "seeds": [0, 1], "samples": 200}


def test_gate_outputs_of_another_metric_or_without_a_common_seed_are_not_compared(tmp_path):
    ids = np.array(["a", "b", "c", "d"])
    common = {"test_ids": ids, "labels": np.eye(4, 2, dtype=np.float32)}
    np.savez(tmp_path / "auroc.npz", metric=np.array("auroc"), seeds=np.array([0]), **common)
    np.savez(tmp_path / "dice.npz", metric=np.array("dice"), seeds=np.array([0]), **common)
    np.savez(tmp_path / "seed1.npz", metric=np.array("auroc"), seeds=np.array([1]), **common)
    with pytest.raises(NotComparable, match="outputs are for dice, not auroc"):
        gate_difference(tmp_path / "auroc.npz", tmp_path / "dice.npz")
    with pytest.raises(NotComparable, match="^the candidate and the champion share no seed$"):
        gate_difference(tmp_path / "auroc.npz", tmp_path / "seed1.npz")


def test_gate_outputs_of_other_images_than_the_test_split_are_refused(work):
    folder, _ = work
    split = json.loads((folder / "findings.split.json").read_text())
    record_ids = [f"study{i:03d}" for i in range(90)]
    (folder / "findings.split.json").write_text(json.dumps({**split, "record_ids": record_ids}))
    path = cell_outputs_path(folder, "classification", "findings", "sista", 1.0, 1)
    np.savez(path, test_index=np.array(TEST[::-1]), logits=np.zeros((80, 3)))
    gate = ("classification", "findings", "auroc", 1.0)
    named = r"test_outputs\.classification\.findings\.sista\.1\.1\.npz: outputs of other images"
    with pytest.raises(ValueError, match=named):
        save_gate_outputs(folder / "candidate.npz", folder, gate, SEEDS)
