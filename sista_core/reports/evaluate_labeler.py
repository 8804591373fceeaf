"""How well the rule-based labeler agrees with Open-I's manual MeSH coding, per finding.

Open-I's coders list the findings a report states as MeSH "major" terms, a heading followed
by qualifiers ("Opacity/lung/base/left/mild"). Each evaluated finding is a set of headings
(optionally requiring a qualifier) on the MeSH side and a set of labeler observations on the
other; a report is positive for it when any matches. The labeler reads findings + impression.

    python -m sista_core.reports.evaluate_labeler [--uncertain negative|positive|both]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

from sista_core.reports.labeler import ReportLabels, label_report
from sista_core.reports.openi import OpenIReport, read_openi_reports


@dataclass(frozen=True)
class MeshRule:
    """MeSH side of one evaluated finding: headings that count, and headings that count only
    with one of the given qualifiers (e.g. "Cardiac Shadow" only when "enlarged")."""

    headings: frozenset[str]
    qualified: tuple[tuple[str, frozenset[str]], ...] = ()

    def matches(self, term: str) -> bool:
        heading, *qualifiers = [part.strip().lower() for part in term.split("/")]
        if heading in self.headings:
            return True
        return any(heading == h and wanted & set(qualifiers) for h, wanted in self.qualified)


def _rule(*headings: str, **qualified: Sequence[str]) -> MeshRule:
    return MeshRule(
        frozenset(h.lower() for h in headings),
        tuple((h.replace("_", " ").lower(), frozenset(q)) for h, q in qualified.items()),
    )


@dataclass(frozen=True)
class EvaluatedFinding:
    name: str
    mesh: MeshRule
    observations: tuple[str, ...]


EVALUATED: tuple[EvaluatedFinding, ...] = (
    EvaluatedFinding("No Finding", _rule("normal"), ("No Finding",)),
    EvaluatedFinding(
        "Cardiomegaly",
        _rule("Cardiomegaly", Cardiac_Shadow=["enlarged"]),
        ("Cardiomegaly",),
    ),
    EvaluatedFinding(
        "Pleural Effusion",
        _rule("Pleural Effusion", Costophrenic_Angle=["blunted"], Sulcus=["blunted"]),
        ("Pleural Effusion",),
    ),
    EvaluatedFinding("Pneumothorax", _rule("Pneumothorax", "Hydropneumothorax"), ("Pneumothorax",)),
    EvaluatedFinding(
        "Opacity/Consolidation",
        _rule("Opacity", "Airspace Disease", "Infiltrate", "Consolidation"),
        ("Lung Opacity", "Consolidation"),
    ),
    EvaluatedFinding("Pneumonia", _rule("Pneumonia"), ("Pneumonia",)),
    EvaluatedFinding("Atelectasis", _rule("Pulmonary Atelectasis"), ("Atelectasis",)),
    EvaluatedFinding(
        "Edema",
        _rule("Edema", "Pulmonary Edema", "Pulmonary Congestion", "Heart Failure"),
        ("Edema",),
    ),
    EvaluatedFinding("Nodule", _rule("Nodule"), ("Nodule",)),
    EvaluatedFinding("Mass", _rule("Mass"), ("Mass",)),
    EvaluatedFinding(
        "Granuloma",
        _rule("Granuloma", "Calcified Granuloma", "Granulomatous Disease"),
        ("Granuloma",),
    ),
    EvaluatedFinding(
        "Emphysema",
        _rule(
            "Emphysema",
            "Pulmonary Emphysema",
            "Pulmonary Disease, Chronic Obstructive",
            Lung=["hyperdistention"],
        ),
        ("Emphysema",),
    ),
    EvaluatedFinding("Scoliosis", _rule("Scoliosis"), ("Scoliosis",)),
    EvaluatedFinding("Fracture", _rule("Fractures, Bone"), ("Fracture",)),
    EvaluatedFinding(
        "Support Devices",
        _rule(
            "Catheters, Indwelling",
            "Implanted Medical Device",
            "Medical Device",
            "Tube, Inserted",
            "Stents",
        ),
        ("Support Devices",),
    ),
)


@dataclass(frozen=True)
class Agreement:
    """Labeler vs MeSH for one finding over all reports; support = MeSH-positive reports."""

    name: str
    support: int
    predicted: int
    true_positive: int

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positive / self.support if self.support else 0.0

    @property
    def f1(self) -> float:
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0


def predicted_positive(
    labels: ReportLabels, observations: tuple[str, ...], uncertain_as_positive: bool
) -> bool:
    """Whether the labeler states any of ``observations`` (uncertain counts if asked)."""
    accepted = {"positive", "uncertain"} if uncertain_as_positive else {"positive"}
    return any(f.observation in observations and f.certainty in accepted for f in labels.findings)


def label_openi(
    reports: Sequence[OpenIReport] | None = None,
) -> list[tuple[OpenIReport, ReportLabels]]:
    """Labeler output for every report that has findings or impression text."""
    reports = reports if reports is not None else read_openi_reports()
    return [(report, label_report(report.text)) for report in reports if report.text]


def evaluate_labeler(
    labelled: Sequence[tuple[OpenIReport, ReportLabels]], uncertain_as_positive: bool = False
) -> list[Agreement]:
    """Per-finding agreement of the labels (``label_openi``) with the MeSH major terms."""
    scores = []
    for finding in EVALUATED:
        support = predicted = true_positive = 0
        for report, labels in labelled:
            gold = any(finding.mesh.matches(term) for term in report.mesh_major)
            said = predicted_positive(labels, finding.observations, uncertain_as_positive)
            support += gold
            predicted += said
            true_positive += gold and said
        scores.append(Agreement(finding.name, support, predicted, true_positive))
    return scores


def format_table(scores: Sequence[Agreement]) -> str:
    lines = [f"{'finding':<24}{'support':>8}{'predicted':>10}{'P':>7}{'R':>7}{'F1':>7}"]
    for s in scores:
        lines.append(
            f"{s.name:<24}{s.support:>8}{s.predicted:>10}"
            f"{s.precision:>7.3f}{s.recall:>7.3f}{s.f1:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uncertain",
        choices=("negative", "positive", "both"),
        default="both",
        help="whether an uncertain label counts as positive against MeSH (default: both tables)",
    )
    args = parser.parse_args(argv)
    labelled = label_openi()
    policies = ("negative", "positive") if args.uncertain == "both" else (args.uncertain,)
    for policy in policies:
        scores = evaluate_labeler(labelled, uncertain_as_positive=policy == "positive")
        print(
            f"\nLabeler vs Open-I MeSH major terms, {len(labelled)} reports "
            f"(uncertain counted as {policy})"
        )
        print(format_table(scores))


if __name__ == "__main__":
    main()
