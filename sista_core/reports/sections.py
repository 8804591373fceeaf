"""Section extraction for free-text (MIMIC-CXR-style) radiology reports.

The rules follow MIMIC-CXR's official ``create_section_files.py``: headers are words ending in
a colon; known variants are normalised ("FINDINGS AND IMPRESSION" and "CONCLUSION" count as
the impression); when a report has neither findings nor impression, the paragraphs after the
first one of its last section are used ("last paragraph"), then a comparison section (where
some radiologists write the whole report), then the whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from sista_core.reports.text import clean_report_text

SectionSource = Literal[
    "findings_impression", "impression_only", "findings_only", "last_paragraph", "full_text"
]

# Header name (lower case, single spaces) -> the section it is; from MIMIC-CXR's list of
# frequent headers and their misspellings.
SECTION_ALIASES: dict[str, str] = {
    "findings": "findings",
    "finding": "findings",
    "findngs": "findings",
    "findins": "findings",
    "finidngs": "findings",
    "reference findings": "findings",
    "chest, two views": "findings",
    "impression": "impression",
    "impressions": "impression",
    "impresson": "impression",
    "impresion": "impression",
    "impession": "impression",
    "imprression": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings / impression": "impression",
    "impression and findings": "impression",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "indication": "indication",
    "indications": "indication",
    "clinical indication": "indication",
    "reason for exam": "indication",
    "reason for examination": "indication",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "technique": "technique",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "notification": "notification",
    "addendum": "addendum",
    "wet read": "wet read",
    "final report": "preamble",
}

# A header: at the start of a line, or right after a sentence end, a name then a colon.
_HEADER = re.compile(
    r"(?:^|(?<=[.!?] ))[ \t]*(?P<name>[A-Za-z][A-Za-z ()/,&-]{0,40}?)[ \t]*:(?!\d)",
    re.MULTILINE,
)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class ReportSections:
    """Findings and impression of one report, cleaned ("" when absent), and which rule
    produced them. ``sections`` keeps every named section found, cleaned, by normalised name."""

    findings: str
    impression: str
    source: SectionSource
    sections: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """Findings then impression: what the labeler and the text encoder read."""
        return " ".join(part for part in (self.findings, self.impression) if part)


def normalise_header(name: str) -> str | None:
    """The section a header names, or None when it is not a section header."""
    key = " ".join(name.lower().split())
    if key in SECTION_ALIASES:
        return SECTION_ALIASES[key]
    # Unknown all-caps headers ("PA AND LATERAL CHEST:") still start a section, as in MIMIC.
    return key if name.isupper() and len(key) > 2 else None


def split_sections(text: str) -> list[tuple[str, str]]:
    """(section name, raw text) in report order; text before the first header is the
    "preamble". Known names match case-insensitively, unknown ones only in capitals."""
    headers = [
        (match, section)
        for match in _HEADER.finditer(text)
        if (section := normalise_header(match.group("name"))) is not None
    ]
    if not headers:
        return [("full_text", text)]
    starts = [match.start() for match, _ in headers] + [len(text)]
    parts = [("preamble", text[: starts[0]])]
    for (match, section), end in zip(headers, starts[1:], strict=True):
        parts.append((section, text[match.end() : end]))
    return parts


def extract_sections(text: str) -> ReportSections:
    """Findings and impression of a free-text report, with MIMIC-CXR's fallbacks."""
    parts = split_sections(text)
    # The last non-empty section of each name wins, as in MIMIC-CXR (addenda come later).
    named = {name: clean_report_text(body) for name, body in parts if body.strip()}
    findings, impression = named.get("findings", ""), named.get("impression", "")
    if findings and impression:
        return ReportSections(findings, impression, "findings_impression", named)
    if impression:
        return ReportSections("", impression, "impression_only", named)
    if findings:
        return ReportSections(findings, "", "findings_only", named)
    last = _after_first_paragraph(parts[-1][1]) or named.get("comparison", "")
    if last:
        return ReportSections(last, "", "last_paragraph", named)
    return ReportSections(clean_report_text(text), "", "full_text", named)


def _after_first_paragraph(body: str) -> str:
    """The paragraphs after the first of a section: in a report without headers the first is
    usually a title or the exam name, the rest is what the radiologist saw."""
    paragraphs = [p for p in _PARAGRAPH_BREAK.split(body.strip()) if p.strip()]
    return clean_report_text("\n\n".join(paragraphs[1:])) if len(paragraphs) > 1 else ""
