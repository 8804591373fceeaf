"""Negation and uncertainty of one mention, decided from the words around it (NegEx-style
cues bounded by the mention's clause; CheXpert's labeler uses the same three outcomes).

A cue before the mention reaches it unless a clause boundary ("but", "however", "which",
";") comes between; cues after the mention are the specific phrases that follow a finding
("... is not seen", "... cannot be excluded"). Sentences are lower-cased.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sista_core.findings import Certainty

_CLAUSE_BOUNDARY = re.compile(
    r"\b(?:but|however|although|though|except|whereas|while|aside from|apart from|"
    r"other than|which|that|otherwise|since)\b|[;:]|\band (?:there|the|a|an)\b"
)
# "No change in the effusion" says the effusion is still there: not a negation of it.
_PSEUDO_NEGATION = re.compile(
    r"\b(?:no|not|without)\s+(?:(?:significant|significantly|appreciable|substantial|"
    r"interval|definite|apparent|other|further|much|real)\s+){0,3}"
    r"(?:change|changed|increase|increased|decrease|decreased|progression|improvement|"
    r"worsening)\b|\bnot only\b"
)
# Uncertainty phrases that contain a negation word, checked before negation.
_NEGATED_UNCERTAINTY = re.compile(
    r"\b(?:can ?not|can't|could not|cannot|not)\s+(?:be\s+)?(?:entirely\s+|completely\s+|"
    r"totally\s+|definitely\s+)?(?:exclude|excluded|rule out|ruled out)\b|"
    r"\b(?:difficult|hard) to (?:exclude|rule out)\b"
)
_NEGATION_BEFORE = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|"
    r"resolved|removal of|never|nor|neither|rather than|ruled out|unlikely|free from)\b"
)
_NEGATION_AFTER = re.compile(
    r"^[\s,]*(?:[\w-]+\s+){0,8}?(?:(?:is|are|was|were|has been|have been|has|have|appears?|"
    r"remains?)\s+)?(?:(?:not|no longer)\s+(?:\w+\s+)?(?:well[- ])?(?:seen|identified|"
    r"visualized|visible|appreciated|present|demonstrated|evident|noted|detected|apparent|"
    r"shown)|absent|resolved|cleared|removed|ruled out|unlikely|excluded|normal|"
    r"within (?:the )?(?:normal limits|limits of normal))\b"
)
_UNCERTAINTY_BEFORE = re.compile(
    r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|questionabl[ey]|question of|"
    r"suspicio\w*|suspect\w*|suggest\w*|concern(?:ing)? for|consider\w*|differential|"
    r"rule out|r/o|equivocal|indeterminate|uncertain|unclear|presum\w*|perhaps|favou?r\w*|"
    r"evaluat\w* for|assess\w* for|to exclude|versus|vs|would|if|potential\w*)\b|\?"
)
_UNCERTAINTY_AFTER = re.compile(
    r"^[\s,]*(?:(?:\w+\s+){0,3}?(?:is|are|was|were|be|appears?|seems?)\s+(?:also\s+|again\s+)?"
    r"(?:possible|possibly|suspected|questioned|questionable|probable|likely|considered|"
    r"not (?:be )?excluded|a possibility)|(?:\w+\s+){0,3}?(?:may|might|could) be "
    r"(?:present|seen)|"
    r"(?:versus|vs|or)\b|\?)"
)
# "A or B", "A versus B": both alternatives are uncertain, when right next to each other.
_ALTERNATIVE_BEFORE = re.compile(r"\b(?:or|versus|vs)\s+(?:\w+\s+){0,3}$")


@dataclass(frozen=True)
class MentionContext:
    """The text of a mention's clause: before it, the mention itself, after it."""

    before: str
    inner: str
    after: str


def mention_context(sentence: str, start: int, end: int) -> MentionContext:
    """Split ``sentence`` around the mention at [start, end), cut at clause boundaries."""
    before = sentence[:start]
    boundaries = list(_CLAUSE_BOUNDARY.finditer(before))
    if boundaries:
        before = before[boundaries[-1].end() :]
    after = sentence[end:]
    boundary = _CLAUSE_BOUNDARY.search(after)
    if boundary:
        after = after[: boundary.start()]
    return MentionContext(before, sentence[start:end], after)


def mention_certainty(context: MentionContext) -> Certainty:
    """Negative, uncertain or positive, from the cues in the mention's clause."""
    before = _PSEUDO_NEGATION.sub(" ", context.before)
    inner = _PSEUDO_NEGATION.sub(" ", context.inner)
    whole = f"{before} {inner} {context.after}"
    if _NEGATED_UNCERTAINTY.search(whole):
        return "uncertain"
    if (
        _NEGATION_BEFORE.search(before)
        or _NEGATION_BEFORE.search(inner)
        or _NEGATION_AFTER.search(context.after)
    ):
        return "negative"
    if (
        _UNCERTAINTY_BEFORE.search(before)
        or _UNCERTAINTY_BEFORE.search(inner)
        or _UNCERTAINTY_AFTER.search(context.after)
        or _ALTERNATIVE_BEFORE.search(before)
    ):
        return "uncertain"
    return "positive"
