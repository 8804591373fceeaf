"""Each downstream set's protocol, before any pixel is read: which records it keeps, their
split, and their label vector (MGCA's preprocessing; docs/data.md)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from protocol_layouts import build_chexpert_small, build_covidx, build_object_cxr, build_siim_acr

from components.platform.config import IngestSection, base_data, load_params, profile_merge
from components.stages.downstream_sets import SetLabels, plan_set
from sista_core.datasets import Sample
from sista_core.datasets.chexpert import five_by_200, only_positive
from sista_core.findings import CHEXPERT_COMPETITION


def plan(kind: str, root, **options):
    spec = {"adapter": kind, "path": str(root), **options}
    only_this_set = {"downstream": {"sets": {"s": spec}}}
    config = IngestSection.model_validate(
        profile_merge(base_data()["ingest"], only_this_set, IngestSection)
    )
    return plan_set("s", config.downstream.sets["s"], config)


def assigned(set_plan) -> list[tuple]:
    return set_plan.assign(list(set_plan.adapter.records()), seed=0)


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    return build_chexpert_small(tmp_path_factory.mktemp("chexpert"))


def test_uncertain_labels_follow_each_findings_policy_and_blanks_are_negative():
    labels = SetLabels(CHEXPERT_COMPETITION, (("Atelectasis", "ones"), ("Edema", "zeros")))
    sample = Sample("r", "p", np.zeros((2, 2), np.uint8), {"Atelectasis": -1.0, "Edema": -1.0})
    assert labels.vector(sample).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_five_by_200_takes_images_where_one_finding_alone_is_positive(chexpert):
    train = list(plan("chexpert", chexpert).adapter.parts["train"].records())
    chosen = five_by_200(train, CHEXPERT_COMPETITION, 2, seed=0)
    assert all(len(refs) == 2 for refs in chosen.values())
    for finding, refs in chosen.items():
        assert all(only_positive(ref.meta["labels"], finding) for ref in refs)
    assert not only_positive({"Edema": 1.0, "Pneumonia": -1.0}, "Edema")  # uncertain: no
    assert only_positive({"Edema": 1.0, "No Finding": 1.0}, "Edema")
    with pytest.raises(ValueError, match="only 'Atelectasis' positive"):
        five_by_200(train, CHEXPERT_COMPETITION, 500, seed=0)


def test_chexpert_tests_on_valid_csv_validates_whole_patients_and_holds_out_5x200(chexpert):
    official = assigned(plan("chexpert", chexpert, val_images=10, per_finding=2))
    zero_shot = assigned(plan("chexpert", chexpert, protocol="5x200", per_finding=2))
    assert {split for _, split in zero_shot} == {"test"} and len(zero_shot) == 10
    held_out = {ref.record_id for ref, _ in zero_shot}
    assert not held_out & {ref.record_id for ref, _ in official}
    valid = (chexpert / "valid.csv").read_text().strip().splitlines()[1:]
    splits = Counter(split for _, split in official)
    assert splits["test"] == len(valid) and splits["val"] >= 10
    val_patients = {ref.patient_id for ref, split in official if split == "val"}
    assert not val_patients & {ref.patient_id for ref, split in official if split == "train"}


def test_siim_balances_training_negatives_with_positives(tmp_path):
    siim = plan("siim_acr", build_siim_acr(tmp_path / "siim", images=60))
    refs = list(siim.adapter.records())
    for ref in refs[20:]:  # 20 positives of 60: as skewed as SIIM (22 % positive)
        ref.meta["rle"] = []
    kept = siim.assign(refs, seed=0)
    assert siim.excluded["balance_train"] > 0
    train = [ref for ref, split in kept if split == "train"]
    positives = sum(bool(ref.meta["rle"]) for ref in train)
    assert positives == len(train) - positives
    patients = Counter(split for _, split in kept)
    assert patients["val"] == patients["test"] == round(0.15 * 60)


def test_covidx_and_object_cxr_test_on_their_official_lists(tmp_path):
    covidx = assigned(plan("covidx", build_covidx(tmp_path / "covidx"), val_fraction=0.2))
    assert Counter(split for _, split in covidx) == {"train": 36, "val": 9, "test": 15}
    objects = assigned(plan("object_cxr", build_object_cxr(tmp_path / "objects")))
    assert Counter(split for _, split in objects) == {"train": 36, "val": 4, "test": 10}


def test_every_profile_names_sets_its_tasks_can_use():
    for profile in ("params.yaml", "profiles/ci.yaml", "profiles/paper.yaml"):
        params = load_params(profile)
        for task, dataset in params.evaluate.cells():
            assert dataset in params.ingest.downstream.sets, (profile, task, dataset)
