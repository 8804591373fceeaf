"""Report text cleaning and sentence splitting, shared by section extraction, the labeler and
the text encoder's input.

De-identification marks become one token, ``XXXX`` (Open-I's own mark), so that MIMIC-CXR's
``___`` and Open-I's ``XXXX`` look alike downstream, where the text encoder masks them out.
"""

from __future__ import annotations

import re

DEIDENTIFIED = "XXXX"

_MIMIC_DEID = re.compile(r"_{2,}")
_WHITESPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([.,;:!?])(?=\s|$)")
# A hard break between sentences even without a full stop: a blank line, or a new line
# that opens a numbered item ("\n 2. Mild cardiomegaly").
_HARD_BREAK = re.compile(r"\n[ \t]*\n|\n[ \t]*(?=\d{1,2}[.)]\s)")
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
_LIST_MARKER = re.compile(r"^\(?\d{1,2}[.)]\s*")
# Abbreviations that never end a sentence, and those that end one only before a capital.
_ABBREVIATIONS = frozenset(
    "dr drs mr mrs ms prof vs v e.g eg i.e ie approx incl fig figs resp pt st cf".split()
)
_SENTENCE_FINAL_ABBREVIATIONS = frozenset("a.m p.m etc".split())


def clean_report_text(text: str) -> str:
    """One line of text: whitespace and line breaks collapsed, MIMIC ``___`` replaced by
    ``XXXX``, no space before punctuation."""
    text = _MIMIC_DEID.sub(f" {DEIDENTIFIED} ", text)
    text = _WHITESPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)


def split_sentences(text: str) -> list[str]:
    """Cleaned sentences of a report or section, numbered-list markers removed. A full stop
    inside a number ("1.5 cm"), after an abbreviation ("vs.", "e.g.") or after a list number
    ("1.") does not end a sentence."""
    sentences: list[str] = []
    for block in _HARD_BREAK.split(text):
        block = clean_report_text(block)
        start = 0
        for end in _SENTENCE_END.finditer(block):
            if _is_sentence_end(block[start : end.start()], block[end.end() :]):
                sentences.append(block[start : end.end()])
                start = end.end()
        sentences.append(block[start:])
    stripped = (_LIST_MARKER.sub("", sentence).strip() for sentence in sentences)
    return [sentence for sentence in stripped if sentence and not _is_punctuation(sentence)]


def _is_sentence_end(before: str, following: str) -> bool:
    """Whether the full stop between ``before`` (the sentence so far) and ``following``
    ends the sentence."""
    words = before.split()
    if not words:
        return False
    last = words[-1].lstrip("(").lower()
    if len(words) == 1 and last.isdigit():
        return False  # a list number opening the sentence: "1. Cardiomegaly."
    if last in _ABBREVIATIONS:
        return False
    if last in _SENTENCE_FINAL_ABBREVIATIONS:
        return following[:1].isupper()
    return not (len(last) == 1 and last.isalpha() and last not in {"a", "i"})


def _is_punctuation(sentence: str) -> bool:
    return not any(ch.isalnum() for ch in sentence)
