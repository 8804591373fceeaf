from sista_core.datasets.splits import nested_subsets, patient_splits

PATIENTS = [f"p{i:04d}" for i in range(1000)]


def test_patient_splits_are_seeded_and_order_independent():
    first = patient_splits(PATIENTS, 0.15, 0.25, seed=3)
    assert first == patient_splits(list(reversed(PATIENTS)), 0.15, 0.25, seed=3)
    assert first != patient_splits(PATIENTS, 0.15, 0.25, seed=4)
    counts = {name: list(first.values()).count(name) for name in ("train", "val", "test")}
    assert counts == {"train": 600, "val": 150, "test": 250}


def test_subsets_are_nested_identical_per_seed_and_never_empty():
    train = [
        p for p, split in patient_splits(PATIENTS, 0.15, 0.25, seed=0).items() if split == "train"
    ]
    subsets = nested_subsets(train, (0.01, 0.1, 1.0), seed=1)
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[1.0]) == set(train)
    assert (len(subsets[0.01]), len(subsets[0.1])) == (6, 60)
    assert subsets == nested_subsets(train, (0.01, 0.1, 1.0), seed=1)
    assert subsets[0.1] != nested_subsets(train, (0.01, 0.1, 1.0), seed=2)[0.1]
    assert len(nested_subsets(train[:20], (0.01,), seed=0)[0.01]) == 1
