"""Report text processing: Open-I reports, section extraction, cleaning and sentence
splitting, and rule-based finding labels with negation and uncertainty.

Pure Python + numpy (no pipeline dependencies), so research code can import it alone.
"""

from .labeler import ReportLabels, label_report
from .openi import OpenIReport, parse_openi_xml, read_openi_reports
from .sections import ReportSections, extract_sections, split_sections
from .text import clean_report_text, split_sentences

__all__ = [
    "OpenIReport",
    "ReportLabels",
    "ReportSections",
    "clean_report_text",
    "extract_sections",
    "label_report",
    "parse_openi_xml",
    "read_openi_reports",
    "split_sections",
    "split_sentences",
]
