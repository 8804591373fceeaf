"""Side, severity and zone of a mention, read from the words next to it in its clause
("small left basilar effusion", "the heart is mildly enlarged"); the phantom renderer draws
the finding where and as large as the report says."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sista_core.findings import Severity, Side, Zone
from sista_core.reports.cues import MentionContext

# How many words either side of a mention its modifiers may be.
WINDOW_WORDS = 6

_SIDE_WORDS: dict[str, Side] = {
    "bilateral": "bilateral",
    "bilaterally": "bilateral",
    "both": "bilateral",
    "bibasilar": "bilateral",
    "bibasal": "bilateral",
    "biapical": "bilateral",
    "left": "left",
    "left-sided": "left",
    "right": "right",
    "right-sided": "right",
}
_SEVERITY_WORDS: dict[str, Severity] = {
    **dict.fromkeys(
        ("tiny", "trace", "small", "minimal", "minimally", "mild", "mildly", "slight"),
        "small",
    ),
    **dict.fromkeys(("slightly", "minor", "borderline", "subtle"), "small"),
    **dict.fromkeys(("moderate", "moderately", "moderate-sized"), "moderate"),
    **dict.fromkeys(
        ("large", "severe", "severely", "marked", "markedly", "massive", "extensive", "huge"),
        "large",
    ),
}
_ZONE_WORDS: dict[str, Zone] = {
    "upper": "upper",
    "middle": "middle",
    "mid": "middle",
    "midlung": "middle",
    "lingula": "middle",
    "lingular": "middle",
    "lower": "lower",
    "retrocardiac": "lower",
    "base": "basilar",
    "bases": "basilar",
    "basilar": "basilar",
    "basal": "basilar",
    "bibasilar": "basilar",
    "bibasal": "basilar",
    "perihilar": "perihilar",
    "parahilar": "perihilar",
    "hilar": "perihilar",
    "apex": "apical",
    "apices": "apical",
    "apical": "apical",
    "biapical": "apical",
}
_SEVERITY_ORDER: dict[Severity, int] = {"small": 0, "moderate": 1, "large": 2}
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)?")
_BOTH_SIDES = re.compile(r"\b(?:left|right)\s+(?:and|greater than|more than|>)\s+(?:left|right)\b")
_PLURAL_PAIRED = re.compile(r"(?:effusions|pneumothoraces)\b")


@dataclass(frozen=True)
class Modifiers:
    """Where and how large a mention says its finding is; None where the text is silent."""

    side: Side | None = None
    severity: Severity | None = None
    zone: Zone | None = None


def mention_modifiers(context: MentionContext) -> Modifiers:
    """Side, severity and zone nearest to the mention: inside it first, then the words just
    before (adjectives), then just after ("... is mildly enlarged"). In a range ("small to
    moderate") the nearest word is its upper end."""
    before = _WORD.findall(context.before)[-WINDOW_WORDS:]
    inner = _WORD.findall(context.inner)
    after = _WORD.findall(context.after)[:WINDOW_WORDS]
    nearest_first = inner + before[::-1] + after
    window = " ".join(before + inner + after)
    side = _first(nearest_first, _SIDE_WORDS)
    if side is not None and _BOTH_SIDES.search(window):
        side = "bilateral"
    if side is None and _PLURAL_PAIRED.search(context.inner):
        side = "bilateral"
    return Modifiers(
        side=side,
        severity=_first(nearest_first, _SEVERITY_WORDS),
        zone=_first(nearest_first, _ZONE_WORDS),
    )


def most_severe(severities: list[Severity | None]) -> Severity | None:
    """The largest severity stated across several mentions of one finding."""
    stated = [s for s in severities if s is not None]
    return max(stated, key=_SEVERITY_ORDER.__getitem__) if stated else None


def _first(words: list[str], vocabulary: dict) -> str | None:
    return next((vocabulary[w] for w in words if w in vocabulary), None)
