"""The embedded segmentation and detection sets: real SIIM masks and RSNA boxes placed into
phantoms, labels and ground truth as drawn, deterministic per record, no shared patients."""

import time

import numpy as np
import pytest

from sista_core.datasets.base import Sample
from sista_core.datasets.embedded_tasks import (
    PhantomOpacityDetection,
    PhantomPneumothoraxSegmentation,
    background_findings,
    rsna_placement,
    rsna_table,
    siim_placement,
    siim_table,
)
from sista_core.findings import Finding
from sista_core.phantom import render

SIZE = 128
TASKS = [PhantomPneumothoraxSegmentation, PhantomOpacityDetection]


def _load_all(dataset) -> list[tuple[dict, Sample]]:
    return [(ref.meta, dataset.load(ref)) for ref in dataset.records()]


@pytest.fixture(scope="module", params=TASKS, ids=lambda task: task.prefix)
def loaded(request):
    dataset = request.param(24, SIZE, seed=3, positive_fraction=0.5)
    return dataset, _load_all(dataset)


def test_the_real_tables_have_their_known_positive_shares():
    siim, rsna = siim_table(), rsna_table()
    assert len(siim.positives) > 2500 and 0.2 < siim.positive_fraction < 0.25
    assert len(rsna.positives) > 6000 and 0.2 < rsna.positive_fraction < 0.25
    assert {len(boxes) for _, boxes in rsna.positives} == {1, 2, 3, 4}


def test_record_ids_are_the_tasks_own_and_a_larger_set_begins_with_the_smaller():
    for task, prefix in (
        (PhantomPneumothoraxSegmentation, "seg-"),
        (PhantomOpacityDetection, "det-"),
    ):
        small, large = list(task(5, seed=1).records()), list(task(9, seed=1).records())
        assert [ref.record_id for ref in small] == [f"{prefix}{n:05d}" for n in range(5)]
        assert all(ref.patient_id == ref.record_id for ref in large)
        for a, b in zip(small, large, strict=False):
            assert a.meta.keys() == b.meta.keys() and a.meta.get("source_id") == b.meta.get(
                "source_id"
            )


def test_samples_are_deterministic(loaded):
    dataset, samples = loaded
    again = type(dataset)(24, SIZE, seed=3, positive_fraction=0.5)
    refs = list(again.records())[:4]
    for ref, (_, sample) in zip(refs, samples, strict=False):
        repeat = again.load(ref)
        assert repeat.image.tobytes() == sample.image.tobytes()
        assert np.array_equal(repeat.mask, sample.mask)
        assert np.array_equal(repeat.boxes, sample.boxes)
    other_seed = list(type(dataset)(4, SIZE, seed=4, positive_fraction=0.5).records())
    assert dataset.load(other_seed[0]).image.tobytes() != samples[0][1].image.tobytes()


def test_positives_carry_the_drawn_truth_and_negatives_none(loaded):
    dataset, samples = loaded
    target = dataset.target
    positives = [sample for meta, sample in samples if "annotation" in meta]
    negatives = [sample for meta, sample in samples if "annotation" not in meta]
    assert 4 <= len(positives) <= 20 and negatives
    for _, sample in samples:
        assert sample.image.shape == (SIZE, SIZE) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (SIZE, SIZE) and sample.mask.dtype == bool
        assert sample.boxes.dtype == np.float32 and sample.boxes.shape[1:] == (4,)
        assert set(sample.labels) == {target}
        assert sample.labels[target] == float(sample.mask.any()) == float(len(sample.boxes) > 0)
    for sample in negatives:
        assert (
            sample.labels[target] == 0.0 and not sample.mask.any() and sample.boxes.shape == (0, 4)
        )
    drawn = [sample for sample in positives if sample.labels[target] == 1.0]
    assert len(drawn) >= len(positives) - 1  # a real annotation may miss the phantom's lungs
    for sample in drawn:
        x0, y0, x1, y1 = sample.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= SIZE).all() and (y1 <= SIZE).all()
        assert (x1 > x0).all() and (y1 > y0).all()
        covered = np.zeros_like(sample.mask)
        for bx0, by0, bx1, by1 in sample.boxes.astype(int):
            covered[by0:by1, bx0:bx1] = True
        assert not (sample.mask & ~covered).any()


def test_detection_boxes_follow_the_rsna_rows():
    dataset = PhantomOpacityDetection(30, SIZE, seed=0, positive_fraction=1.0)
    for meta, sample in _load_all(dataset):
        assert 1 <= len(meta["annotation"]) <= 4
        assert len(sample.boxes) <= len(meta["annotation"])


def test_positive_fraction_is_configurable_and_defaults_to_the_tables():
    def share(task, fraction):
        refs = list(task(400, seed=0, positive_fraction=fraction).records())
        return np.mean(["annotation" in ref.meta for ref in refs])

    for task in TASKS:
        assert share(task, 0.0) == 0.0 and share(task, 1.0) == 1.0
        assert 0.15 < share(task, None) < 0.29
    with pytest.raises(ValueError, match="positive_fraction"):
        PhantomOpacityDetection(3, positive_fraction=1.5)


def test_films_are_not_trivially_clean():
    refs = list(PhantomPneumothoraxSegmentation(40, seed=0).records())
    with_others = [background_findings(ref.meta["chexpert_row"], frozenset()) for ref in refs]
    assert sum(bool(findings) for findings in with_others) > 10
    excluded = PhantomOpacityDetection.confusable
    for ref in refs:
        findings = background_findings(ref.meta["chexpert_row"], excluded)
        assert not {finding.observation for finding in findings} & excluded


@pytest.mark.parametrize("seed", range(3))
def test_a_real_rsna_box_lands_where_the_mapping_puts_it(seed):
    _, boxes = rsna_table().positives[100 + seed]
    phantom = render([Finding("Lung Opacity")], seed, 224, {"Lung Opacity": rsna_placement(boxes)})
    requested = phantom.placed["Lung Opacity"] & phantom.anatomy["lungs"]
    drawn = phantom.masks["Lung Opacity"]
    rows, cols = np.nonzero(drawn)
    want_rows, want_cols = np.nonzero(requested)
    offset = np.hypot(cols.mean() - want_cols.mean(), rows.mean() - want_rows.mean())
    assert offset < 0.05 * 224
    assert (drawn & requested).sum() > 0.6 * requested.sum()


def test_real_siim_masks_land_inside_the_thorax():
    rng = np.random.default_rng(0)
    positives = siim_table().positives
    nonempty = 0
    for index, seed in zip(rng.choice(len(positives), 12, replace=False), range(12), strict=True):
        _, parts = positives[index]
        phantom = render(
            [Finding("Pneumothorax")], seed, SIZE, {"Pneumothorax": siim_placement(parts)}
        )
        air = phantom.masks.get("Pneumothorax")
        if air is None:
            continue
        nonempty += 1
        assert (air & phantom.anatomy["thorax"]).sum() / air.sum() > 0.95
    assert nonempty >= 11


def test_a_sample_renders_quickly():
    for task in TASKS:
        dataset = task(12, SIZE, seed=5, positive_fraction=0.5)
        refs = list(dataset.records())
        for ref in refs:  # a lung template decodes on its first use in a process (~0.1 s)
            dataset.load(ref)
        start = time.perf_counter()
        for ref in refs:
            dataset.load(ref)
        per_image = (time.perf_counter() - start) / len(refs)
        print(f"{task.__name__}: {1000 * per_image:.1f} ms per {SIZE}-px image")
        assert per_image < 0.15
