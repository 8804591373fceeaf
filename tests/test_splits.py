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


def test_ingest_saves_each_seeds_subsets_as_whole_patients_of_the_sets_training_split(tmp_path):
    """components.stages.ingest.write_subsets: the id lists evaluation reads, checked against the
    manifest rows by hand (file names spelled out, patients counted with ceil)."""
    import math
    from types import SimpleNamespace

    from components.stages.ingest import write_subsets

    rows = []
    for p in range(8):  # set "chest": 8 training patients with 1 to 3 records each
        rows += [
            {"dataset": "chest", "split": "train", "patient_id": f"p{p}", "record_id": f"r{p}-{r}"}
            for r in range(1 + p % 3)
        ]
    rows += [
        {"dataset": "chest", "split": "test", "patient_id": "t0", "record_id": "t0-0"},
        {"dataset": "chest", "split": "val", "patient_id": "v0", "record_id": "v0-0"},
        {"dataset": "other", "split": "train", "patient_id": "o0", "record_id": "o0-0"},
    ]
    train = {r["record_id"]: r["patient_id"] for r in rows[:-3]}  # 15 records of 8 patients
    config = SimpleNamespace(downstream=SimpleNamespace(seeds=(0, 1), label_fractions=(0.25, 1.0)))
    folder = tmp_path / "subsets"
    assert write_subsets(rows, config, folder, "chest") == 4
    assert write_subsets(rows, config, folder, "chest") == 4  # the folder may exist already
    saved = {}
    for seed in (0, 1):
        for fraction, name in ((0.25, "0.25"), (1.0, "1")):
            text = (folder / f"chest-train-frac{name}-seed{seed}.txt").read_text()
            assert text.endswith("\n") and not text.endswith("\n\n")
            ids = text.split("\n")[:-1]
            assert ids == sorted(ids) and set(ids) <= set(train)
            patients = {train[i] for i in ids}
            assert len(patients) == math.ceil(fraction * 8)
            # whole patients: every record of a chosen patient, none of another's
            assert set(ids) == {i for i, p in train.items() if p in patients}
            saved[fraction, seed] = set(ids)
        assert saved[0.25, seed] < saved[1.0, seed] == set(train)
    assert len(list(folder.iterdir())) == 4
    assert saved[0.25, 0] != saved[0.25, 1]  # each seed draws its own subset
    first = {f.name: f.read_text() for f in folder.iterdir()}
    write_subsets(rows, config, folder, "chest")
    assert first == {f.name: f.read_text() for f in folder.iterdir()}  # seeded: identical
