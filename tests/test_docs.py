"""The user documentation stands alone: every link in README.md and docs/ resolves inside the
repository (a file, and a heading when the link names one), nothing points outside it, and
the README keeps its shape (the two commands first, the layout early, at most 250 lines)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        if not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return anchors


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+://", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_link_resolves_inside_the_repository(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve: {broken}"


def test_nothing_refers_to_notes_outside_the_repository():
    outside = "../" + "shared"
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("sista_core", "components", "pipeline", "tests", "bench", "docs", "infra")
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
        and path.suffix in {".py", ".md", ".yaml", ".yml", ".txt"}
        and outside in path.read_text(errors="replace")
    ]
    offenders += [
        name for name in ("README.md", "Makefile") if outside in (ROOT / name).read_text()
    ]
    assert not offenders


def test_the_readme_opens_with_the_two_commands_and_shows_results_and_layout_early():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first_code = lines.index("```") + 1
    assert [line.split()[:2] for line in lines[first_code : first_code + 2]] == [
        ["make", "repro"],
        ["make", "test"],
    ]
    head = "\n".join(lines[:60])
    assert "## What you get" in head and "| SISTA |" in head
    layout = lines.index("## Layout")
    assert lines.index("```", layout + 2) < 60, "the layout tree ends after line 60"
