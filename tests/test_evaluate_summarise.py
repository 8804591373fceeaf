"""evaluate's results table: mean and std over seeds, recomputed by hand from a cell list."""

import statistics

import pytest

from components.stages.evaluate import summarise

SETS = {
    "chexpert": {"images": "real", "single_label": False},
    "covidx": {"images": "real", "single_label": True},
    "rsna": {"images": "phantom", "single_label": False},
}


def cells():
    """Three seeds per (init, fraction), interleaved, a set of each kind of metric."""
    rows = []
    scores = {
        ("sista", 0.01): [0.61, 0.65, 0.70],
        ("sista", 1.0): [0.80, 0.82, 0.84],
        ("random", 0.01): [0.50, 0.55, 0.51],
        ("random", 1.0): [0.60, 0.58, 0.62],
    }
    for seed in range(3):
        for (init, fraction), values in scores.items():
            base = {"init": init, "fraction": fraction, "seed": seed}
            value = values[seed]
            rows.append({**base, "task": "classification", "set": "chexpert", "auroc": value})
            rows.append({**base, "task": "classification", "set": "covidx", "accuracy": value / 2})
            rows.append(
                {
                    **base,
                    "task": "detection",
                    "set": "rsna",
                    "map_40_75": value / 4,
                    "map_50": value / 3,
                }
            )
    return rows


def by_hand(values):
    return {"mean": sum(values) / len(values), "std": statistics.pstdev(values), "n": len(values)}


def test_summary_is_the_mean_and_std_over_seeds_of_each_cell_group():
    summary = summarise(cells(), SETS)
    chexpert = summary["classification"]["chexpert"]
    assert chexpert["images"] == "real" and set(chexpert) == {"images", "auroc"}
    expected = {
        "sista": {"0.01": by_hand([0.61, 0.65, 0.70]), "1": by_hand([0.80, 0.82, 0.84])},
        "random": {"0.01": by_hand([0.50, 0.55, 0.51]), "1": by_hand([0.60, 0.58, 0.62])},
    }
    assert {i: set(f) for i, f in chexpert["auroc"].items()} == {
        i: set(f) for i, f in expected.items()
    }
    for init, by_fraction in expected.items():
        for fraction, stats in by_fraction.items():
            assert chexpert["auroc"][init][fraction] == pytest.approx(stats)
    # sqrt(((-0.13)^2 + (-0.01)^2 + 0.14^2) / 9 / 3): the population std, not the sample's
    assert chexpert["auroc"]["sista"]["0.01"]["std"] == pytest.approx(0.036818, abs=1e-6)
    # A single-label set reports accuracy; detection both of its mAPs.
    covidx = summary["classification"]["covidx"]
    assert set(covidx) == {"images", "accuracy"}
    assert covidx["accuracy"]["random"]["1"] == pytest.approx(by_hand([0.30, 0.29, 0.31]))
    rsna = summary["detection"]["rsna"]
    assert rsna["images"] == "phantom" and set(rsna) == {"images", "map_40_75", "map_50"}
    assert rsna["map_40_75"]["sista"]["1"] == pytest.approx(by_hand([0.20, 0.205, 0.21]))
    assert rsna["map_50"]["random"]["0.01"] == pytest.approx(
        by_hand([0.50 / 3, 0.55 / 3, 0.51 / 3])
    )


def test_one_seed_gives_a_zero_std_and_n_one():
    one_seed = [c for c in cells() if c["seed"] == 0]
    summary = summarise(one_seed, SETS)
    assert summary["classification"]["chexpert"]["auroc"]["sista"]["1"] == {
        "mean": 0.80,
        "std": 0.0,
        "n": 1,
    }


def test_a_set_is_multi_label_unless_it_says_otherwise():
    from components.stages.evaluate import metric_names

    assert metric_names("classification") == ("auroc",)
    assert metric_names("classification", single_label=True) == ("accuracy",)
    assert metric_names("segmentation", single_label=True) == ("dice",)
