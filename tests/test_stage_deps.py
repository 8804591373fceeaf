"""dvc.yaml lists every project module a stage runs as one of its deps: a change to any of
them re-runs the stage under `dvc repro` (a module missing there would leave a stale output
that DVC calls current). The modules are found from the imports, followed transitively from
the launcher and the stage's own module."""

import ast
from pathlib import Path

import pytest
import yaml

from components.platform.stage import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "sista_core", "pipeline")


def module_file(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_files(file: Path) -> set[Path]:
    """The project files ``file`` imports anywhere in its body (packages on the way included)."""
    dotted = ".".join(file.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = dotted if file.name == "__init__.py" else dotted.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = node.module or ""
            if node.level:
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PACKAGES:
                continue
            for end in range(1, len(parts) + 1):
                found |= {f for f in [module_file(".".join(parts[:end]))] if f}
    return found


def run_by(stage: str) -> set[str]:
    todo, seen = [ROOT / "pipeline/launch.py", ROOT / f"components/stages/{stage}.py"], set()
    while todo:
        file = todo.pop()
        if file not in seen:
            seen.add(file)
            todo.extend(imported_files(file) - seen)
    return {str(file.relative_to(ROOT)) for file in seen}


@pytest.mark.parametrize("stage", STAGES)
def test_every_module_a_stage_runs_is_among_its_deps(stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code = [dep.rstrip("/") for dep in deps if not dep.startswith("data/")]
    missing = [
        m for m in sorted(run_by(stage)) if not any(m == d or m.startswith(d + "/") for d in code)
    ]
    assert not missing, (
        f"dvc.yaml: stage {stage} runs these modules without listing them: {missing}"
    )
    for dep in code:
        assert (ROOT / dep).exists(), f"dvc.yaml: {stage} lists {dep}, which does not exist"
