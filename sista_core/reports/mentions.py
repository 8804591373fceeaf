"""What counts as a mention of each observation in a (lower-cased) report sentence.

Phrases follow the CheXpert labeler's mention lists where they apply, with the wording of
Open-I and MIMIC-CXR reports added (``xxxx`` is the de-identification mark, lower-cased).
``NORMAL_STATEMENTS`` are phrasings that state an observation is absent without a negation
word ("heart size is normal", "lungs are clear"): they count as negative mentions.
"""

from __future__ import annotations

import re

_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size|contour)s?|heart size)"
_MEDIASTINUM = r"(?:mediastin\w*|cardiomediastin\w*)(?: (?:silhouette|contour|width)s?)?"
_ENLARGED = r"(?:enlarged|enlargement|large|larger|increased|widen\w*|prominen\w*)"
_CP_ANGLE = r"(?:costophrenic|cp)(?: (?:angles?|recess(?:es)?|sulc(?:us|i)|xxxx))?"

MENTIONS: dict[str, tuple[str, ...]] = {
    "Enlarged Cardiomediastinum": (
        rf"{_MEDIASTINUM} (?:\w+ ){{0,3}}?{_ENLARGED}",
        rf"{_ENLARGED} (?:\w+ ){{0,2}}?{_MEDIASTINUM}",
    ),
    "Cardiomegaly": (
        r"cardiomegaly",
        r"cardiac enlargement",
        rf"{_HEART} (?:\w+ ){{0,4}}?(?:enlarged|enlargement|large|increased)",
        rf"(?:enlarged|enlargement of(?: the)?|large|borderline(?: enlarged)?) {_HEART}",
    ),
    "Lung Opacity": (
        r"opaci(?:ty|ties|fication|fied)",
        r"infiltrat\w*",
        r"air ?-?space (?:disease|process|filling)",
        r"(?:hazy|ground-glass|ground glass|patchy|airspace|parenchymal|pulmonary|lung) "
        r"densit(?:y|ies)",
    ),
    "Lung Lesion": (r"\blesions?\b", r"cavit(?:y|ies|ary|ation)"),
    "Edema": (
        r"(?<!soft tissue )edema",
        r"(?:vascular|venous|pulmonary) (?:congestion|engorgement|redistribution)",
        r"vascular (?:prominence|indistinctness)",
        r"congestive heart failure|\bchf\b|heart failure",
        r"(?:fluid|volume) overload",
        r"cephalization|kerley",
        r"(?:vessels|vascularity|vasculature|xxxx) (?:\w+ ){0,2}?(?:engorged|congested)",
        r"increased (?:\w+ )?vascularity|indistinct (?:pulmonary )?vascula\w*",
        r"venous hypertension",
    ),
    "Consolidation": (r"consolidat\w*",),
    "Pneumonia": (r"pneumonia|pneumonitis", r"(?<!granulomatous )infectio(?:n|us)"),
    "Atelectasis": (
        r"atelecta\w*",
        r"collapsed? (?:of )?(?:the )?(?:\w+ ){0,2}(?:lobe|lung)",
        r"(?:lobar|lobe|lung) collapse",
    ),
    "Pneumothorax": (r"\w*pneumothora(?:x|ces)", r"\bptx\b", r"pleural air\b"),
    "Pleural Effusion": (
        r"(?<!pericardial )(?<!joint )effusions?\b",
        r"pleural fluid|hydrothorax",
        rf"blunt\w* (?:of )?(?:the )?(?:(?:left|right|bilateral|both|posterior) )?{_CP_ANGLE}",
        rf"{_CP_ANGLE} (?:\w+ ){{0,2}}?blunt\w*",
    ),
    "Pleural Other": (
        r"pleural (?:thickening|scarring|plaques?|calcifications?)",
        r"fibrothorax",
    ),
    "Fracture": (r"fractur\w*",),
    "Support Devices": (
        r"pacemaker|\bpacer\b|defibrillator|\baicd\b|\bicd\b",
        r"catheters?\b|\bpicc\b|port-?a-?cath|portacath|\bport\b",
        r"(?:central|venous|arterial|jugular|subclavian|femoral|enteric|feeding) (?:\w+ )?lines?\b",
        r"\btubes?\b|\btubing\b|\btips?\b",
        r"\bstents?\b|\bleads?\b|\bwires?\b|hardware|(?<!breast )prosthe\w*|\bdevices?\b",
        r"generator|stimulator|valve (?:replacement|prosthesis)",
    ),
    # "Nodular opacity" is a rounded opacity, not a nodule (Open-I codes it as an opacity).
    "Nodule": (r"nodules?\b",),
    "Mass": (r"\bmass(?:es)?\b", r"tumou?r|neoplasm|carcinoma|malignan\w*"),
    "Granuloma": (r"granulom\w*",),
    "Emphysema": (
        r"(?<!subcutaneous )emphysem\w*",
        r"hyper-?(?:inflat|expan|aerat|disten)\w*",
        r"\bcopd\b|chronic obstructive",
    ),
    "Scoliosis": (
        r"\w*scolio\w*",
        r"(?:dextro|levo)-? ?curvature",
        r"curvature (?:of|in|within) (?:the )?(?:\w+ )?spine",
        r"(?:spin\w*|thoracic|lumbar|thoracolumbar) curvature",
    ),
}

_NORMAL = r"(?:normal|within normal limits|unremarkable|not enlarged)"

NORMAL_STATEMENTS: dict[str, tuple[str, ...]] = {
    "Cardiomegaly": (
        rf"{_HEART} (?:\w+ ){{0,4}}?{_NORMAL}",
        rf"normal (?:\w+ ){{0,1}}?{_HEART}",
        rf"(?:cardiomediastinal|heart and mediastin\w*) (?:\w+ ){{0,3}}?{_NORMAL}",
    ),
    "Enlarged Cardiomediastinum": (
        rf"{_MEDIASTINUM} (?:\w+ ){{0,3}}?{_NORMAL}",
        rf"normal (?:\w+ ){{0,1}}?{_MEDIASTINUM}",
    ),
    "Lung Opacity": (r"lungs? (?:are |is |remain |appear )?(?:\w+ )?clear", r"clear lungs?"),
}


def compile_patterns(patterns: dict[str, tuple[str, ...]]) -> dict[str, re.Pattern[str]]:
    """One alternation per observation, so a sentence is scanned once per observation."""
    return {
        name: re.compile("|".join(f"(?:{p})" for p in group)) for name, group in patterns.items()
    }


MENTION_PATTERNS = compile_patterns(MENTIONS)
NORMAL_PATTERNS = compile_patterns(NORMAL_STATEMENTS)
