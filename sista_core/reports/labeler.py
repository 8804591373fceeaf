"""Rule-based finding labels of a radiology report, with negation and uncertainty (the
CheXpert labeler's outcomes: positive, uncertain, negative, or not mentioned).

Each sentence is scanned for mentions of every observation (``mentions.py``); each mention
gets a certainty from the cues in its clause (``cues.py``) and a side, severity and zone from
the words next to it (``modifiers.py``). Mentions of one observation merge across the report:
positive beats uncertain beats negative. "No Finding" is positive when nothing but support
devices is positive or uncertain, as in CheXpert.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from sista_core.findings import OBSERVATIONS, Certainty, Finding, Side
from sista_core.reports.cues import mention_certainty, mention_context
from sista_core.reports.mentions import MENTION_PATTERNS, NORMAL_PATTERNS
from sista_core.reports.modifiers import mention_modifiers, most_severe
from sista_core.reports.text import split_sentences

CERTAINTY_VALUE: dict[Certainty, float] = {"positive": 1.0, "uncertain": -1.0, "negative": 0.0}
_CERTAINTY_RANK: dict[Certainty, int] = {"negative": 0, "uncertain": 1, "positive": 2}
# Findings that a nodule or a mass implies (findings.py: both are lung lesions).
_IMPLIES: dict[str, str] = {"Nodule": "Lung Lesion", "Mass": "Lung Lesion"}
_NOT_A_FINDING = frozenset({"No Finding", "Support Devices"})


@dataclass(frozen=True)
class ReportLabels:
    """The findings a report states, one per mentioned observation, in ``OBSERVATIONS``
    order."""

    findings: list[Finding]

    def vector(self, observations: tuple[str, ...] = OBSERVATIONS) -> np.ndarray:
        """(len(observations),) float32: 1 positive, 0 negative, -1 uncertain, nan not
        mentioned (CheXpert's label-table convention)."""
        values = self.labels()
        return np.array([values.get(name, np.nan) for name in observations], dtype=np.float32)

    def labels(self) -> dict[str, float]:
        """Observation -> 1.0 / 0.0 / -1.0 for the mentioned ones (``Sample.labels``)."""
        return {f.observation: CERTAINTY_VALUE[f.certainty] for f in self.findings}

    def positive(self) -> list[str]:
        """Names of the observations stated as present."""
        return [f.observation for f in self.findings if f.certainty == "positive"]


def sentence_findings(sentence: str) -> list[Finding]:
    """Every mention in one sentence, as a Finding each (an observation may repeat)."""
    lowered = sentence.lower()
    found: list[Finding] = []
    for observation, pattern in MENTION_PATTERNS.items():
        for match in pattern.finditer(lowered):
            context = mention_context(lowered, match.start(), match.end())
            modifiers = mention_modifiers(context)
            found.append(
                Finding(
                    observation,
                    mention_certainty(context),
                    modifiers.side,
                    modifiers.severity,
                    modifiers.zone,
                )
            )
    for observation, pattern in NORMAL_PATTERNS.items():
        if pattern.search(lowered):
            found.append(Finding(observation, "negative"))
    return found


def label_report(text: str) -> ReportLabels:
    """Findings of a report (or of its findings + impression sections)."""
    mentions: dict[str, list[Finding]] = defaultdict(list)
    for sentence in split_sentences(text):
        for finding in sentence_findings(sentence):
            mentions[finding.observation].append(finding)
            if finding.observation in _IMPLIES:
                implied = replace(finding, observation=_IMPLIES[finding.observation])
                mentions[implied.observation].append(implied)
    merged = {name: merge_mentions(group) for name, group in mentions.items()}
    if not any(
        f.certainty != "negative" for name, f in merged.items() if name not in _NOT_A_FINDING
    ):
        merged["No Finding"] = Finding("No Finding")
    return ReportLabels([merged[name] for name in OBSERVATIONS if name in merged])


def merge_mentions(mentions: list[Finding]) -> Finding:
    """One finding from several mentions of an observation: the most certain statement wins;
    its mentions' sides combine (left + right = bilateral) and the largest severity counts."""
    best = max(mentions, key=lambda f: _CERTAINTY_RANK[f.certainty])
    winners = [f for f in mentions if f.certainty == best.certainty]
    return Finding(
        best.observation,
        best.certainty,
        _combined_side([f.side for f in winners]),
        most_severe([f.severity for f in winners]),
        next((f.zone for f in winners if f.zone is not None), None),
    )


def _combined_side(sides: list[Side | None]) -> Side | None:
    stated = {s for s in sides if s is not None}
    if not stated:
        return None
    return stated.pop() if len(stated) == 1 else "bilateral"
