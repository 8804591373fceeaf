"""Rule-based finding labels: negation, uncertainty, side/severity/zone, No Finding."""

from __future__ import annotations

import numpy as np
import pytest

from sista_core.findings import OBSERVATIONS
from sista_core.reports import label_report


def certainty(text: str, observation: str) -> str | None:
    found = {f.observation: f for f in label_report(text).findings}
    return found[observation].certainty if observation in found else None


@pytest.mark.parametrize(
    "text, observation, expected",
    [
        ("Small left pleural effusion.", "Pleural Effusion", "positive"),
        ("No pleural effusion.", "Pleural Effusion", "negative"),
        ("There is no evidence of pneumothorax.", "Pneumothorax", "negative"),
        ("Negative for focal consolidation.", "Consolidation", "negative"),
        ("Lungs are hyperinflated without focal consolidation.", "Emphysema", "positive"),
        (
            "No focal consolidation, pneumothorax, or large effusion.",
            "Pleural Effusion",
            "negative",
        ),
        ("The pneumothorax has resolved.", "Pneumothorax", "negative"),
        ("Previously seen nodule is not well seen today.", "Nodule", "negative"),
        ("Heart is not enlarged.", "Cardiomegaly", "negative"),
        ("Heart size is within normal limits.", "Cardiomegaly", "negative"),
        ("No pneumothorax, but there is a small right effusion.", "Pleural Effusion", "positive"),
        ("No change in the small left effusion.", "Pleural Effusion", "positive"),
        ("Possible small left effusion.", "Pleural Effusion", "uncertain"),
        ("Pneumonia cannot be excluded.", "Pneumonia", "uncertain"),
        ("Cannot exclude early pneumonia.", "Pneumonia", "uncertain"),
        ("Basilar opacity may represent atelectasis.", "Atelectasis", "uncertain"),
        ("Basilar opacity may represent atelectasis.", "Lung Opacity", "positive"),
        ("Left base opacity, likely atelectasis.", "Lung Opacity", "positive"),
        ("Atelectasis versus scarring at the left base.", "Atelectasis", "uncertain"),
        ("Questionable right apical pneumothorax.", "Pneumothorax", "uncertain"),
        ("Mild pulmonary vascular congestion.", "Edema", "positive"),
        ("Blunting of the left costophrenic angle.", "Pleural Effusion", "positive"),
        ("The heart is enlarged.", "Cardiomegaly", "positive"),
        ("Enlarged cardiac silhouette.", "Cardiomegaly", "positive"),
        ("Lungs are hyperexpanded.", "Emphysema", "positive"),
        ("Subcutaneous emphysema in the neck.", "Emphysema", None),
        ("Small pericardial effusion.", "Pleural Effusion", None),
        ("Mild dextroscoliosis of the thoracic spine.", "Scoliosis", "positive"),
        ("Calcified granuloma in the right upper lobe.", "Granuloma", "positive"),
    ],
)
def test_certainty_of_a_mention(text, observation, expected):
    assert certainty(text, observation) == expected


def test_nodule_implies_lung_lesion():
    assert certainty("A 5 mm nodule in the right upper lobe.", "Lung Lesion") == "positive"


def test_side_severity_and_zone_come_from_the_words_around_the_mention():
    findings = {
        f.observation: f
        for f in label_report(
            "Small right apical pneumothorax. Moderate to large left basilar effusion. "
            "The heart is mildly enlarged. Bibasilar atelectasis."
        ).findings
    }
    pneumothorax = findings["Pneumothorax"]
    assert (pneumothorax.side, pneumothorax.severity, pneumothorax.zone) == (
        "right",
        "small",
        "apical",
    )
    effusion = findings["Pleural Effusion"]
    assert (effusion.side, effusion.severity, effusion.zone) == ("left", "large", "basilar")
    assert findings["Cardiomegaly"].severity == "small"
    assert (findings["Atelectasis"].side, findings["Atelectasis"].zone) == ("bilateral", "basilar")


def test_left_and_right_mentions_merge_into_bilateral():
    effusion = label_report("Small left effusion. Moderate right effusion.").findings[0]
    assert (effusion.side, effusion.severity) == ("bilateral", "moderate")
    assert label_report("Right greater than left pleural effusions.").findings[0].side == (
        "bilateral"
    )


def test_positive_beats_uncertain_beats_negative_across_sentences():
    assert certainty("No effusion. Small right effusion.", "Pleural Effusion") == "positive"
    assert certainty("No pneumonia. Possible pneumonia.", "Pneumonia") == "uncertain"


def test_no_finding_when_only_negatives_and_devices():
    text = "Pacemaker leads in place. No pneumothorax or effusion. Lungs are clear."
    assert certainty(text, "No Finding") == "positive"
    assert certainty(text, "Support Devices") == "positive"


def test_no_finding_absent_when_anything_is_positive_or_uncertain():
    assert certainty("Mild cardiomegaly. No effusion.", "No Finding") is None
    assert certainty("Possible small effusion.", "No Finding") is None


def test_vector_uses_chexpert_values_in_observation_order():
    labels = label_report("Mild cardiomegaly. No pneumothorax. Possible left basilar pneumonia.")
    vector = labels.vector()
    assert vector.dtype == np.float32 and vector.shape == (len(OBSERVATIONS),)
    value = dict(zip(OBSERVATIONS, vector.tolist(), strict=True))
    assert value["Cardiomegaly"] == 1.0
    assert value["Pneumothorax"] == 0.0
    assert value["Pneumonia"] == -1.0
    assert np.isnan(value["Edema"]) and np.isnan(value["No Finding"])
    assert labels.vector(("Pneumothorax", "Cardiomegaly")).tolist() == [0.0, 1.0]
    assert labels.labels() == {"Cardiomegaly": 1.0, "Pneumonia": -1.0, "Pneumothorax": 0.0}
