"""Section extraction, cleaning and sentence splitting of MIMIC-CXR-style free text."""

from __future__ import annotations

from sista_core.reports import clean_report_text, extract_sections, split_sentences

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // ?pna

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear.  There is a small left
 pleural effusion.  Heart size is normal.

 IMPRESSION:

 Small left pleural effusion.
"""


def test_findings_and_impression_are_both_extracted_and_cleaned():
    sections = extract_sections(MIMIC_REPORT)
    assert sections.source == "findings_impression"
    assert sections.findings == (
        "The lungs are clear. There is a small left pleural effusion. Heart size is normal."
    )
    assert sections.impression == "Small left pleural effusion."
    assert sections.sections["comparison"] == "XXXX"
    assert sections.sections["indication"].startswith("XXXX F with cough")
    assert sections.text == f"{sections.findings} {sections.impression}"


def test_impression_only_report_falls_back_to_the_impression():
    report = "EXAMINATION: Chest.\n\nINDICATION: Fever.\n\nIMPRESSION: No acute process."
    sections = extract_sections(report)
    assert (sections.source, sections.findings) == ("impression_only", "")
    assert sections.impression == "No acute process."


def test_findings_only_report_falls_back_to_the_findings():
    sections = extract_sections("INDICATION: Cough.\nFINDINGS: Mild cardiomegaly.\n")
    assert (sections.source, sections.findings) == ("findings_only", "Mild cardiomegaly.")


def test_empty_impression_header_does_not_hide_the_findings():
    sections = extract_sections("FINDINGS: Lungs clear.\nIMPRESSION:\n")
    assert (sections.source, sections.findings) == ("findings_only", "Lungs clear.")


def test_combined_and_conclusion_headers_count_as_impression():
    combined = extract_sections("INDICATION: Dyspnea.\nFINDINGS AND IMPRESSION: Lungs clear.")
    conclusion = extract_sections("Technique: PA.\nConclusion: Small effusion.")
    assert (combined.source, combined.impression) == ("impression_only", "Lungs clear.")
    assert (conclusion.source, conclusion.impression) == ("impression_only", "Small effusion.")


def test_headers_match_case_insensitively_and_mid_line():
    sections = extract_sections("Findings: Heart size: normal. Lungs clear. Impression: normal.")
    assert sections.findings == "Heart size: normal. Lungs clear."
    assert sections.impression == "normal."


def test_last_impression_wins_when_repeated():
    sections = extract_sections("IMPRESSION: Preliminary read.\nADDENDUM: x\nIMPRESSION: Final.")
    assert sections.impression == "Final."


def test_report_without_headers_uses_the_paragraphs_after_the_title():
    report = "CHEST RADIOGRAPH ON ___\n \n Heart size normal. Lungs clear.\n \n No pneumothorax."
    sections = extract_sections(report)
    assert sections.source == "last_paragraph"
    assert sections.findings == "Heart size normal. Lungs clear. No pneumothorax."


def test_single_paragraph_without_headers_is_taken_whole():
    sections = extract_sections("Heart size normal.\nLungs clear.")
    assert (sections.source, sections.findings) == ("full_text", "Heart size normal. Lungs clear.")


def test_cleaning_collapses_whitespace_and_unifies_deidentification():
    assert clean_report_text("  Seen on ___ ,\n\n  unchanged .  ") == "Seen on XXXX, unchanged."
    assert clean_report_text("Normal chest x-XXXX. XXXX XXXX") == "Normal chest x-XXXX. XXXX XXXX"


def test_sentences_do_not_split_on_decimals_or_abbreviations():
    text = "A 1.5 cm nodule, e.g. granuloma vs. scar. Dr. Smith was paged at 3 p.m. Stable."
    assert split_sentences(text) == [
        "A 1.5 cm nodule, e.g. granuloma vs. scar.",
        "Dr. Smith was paged at 3 p.m.",
        "Stable.",
    ]
    assert split_sentences("Paged at 3 p.m. on XXXX.") == ["Paged at 3 p.m. on XXXX."]


def test_numbered_items_become_sentences_without_their_numbers():
    text = "IMPRESSION:\n 1. Mild cardiomegaly\n 2. No effusion. 3. Normal x-XXXX."
    assert split_sentences(text) == [
        "IMPRESSION:",
        "Mild cardiomegaly",
        "No effusion.",
        "Normal x-XXXX.",
    ]
    assert split_sentences(" 1. Mild cardiomegaly.\n 2. No effusion.") == [
        "Mild cardiomegaly.",
        "No effusion.",
    ]


def test_blank_lines_end_sentences_and_empty_pieces_are_dropped():
    assert split_sentences("Lungs clear\n\nHeart normal\n\n . ") == ["Lungs clear", "Heart normal"]
