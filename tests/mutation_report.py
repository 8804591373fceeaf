"""The report of ``make mutation``: per module, how many of its mutants the fast tier killed,
and each survivor with its diff and the one-line explanation docs/mutation-survivors.md gives
it: equivalent (no input the pipeline can give tells it apart), or observable only on a GPU
(its section "observable only on a GPU": the tests run on the CPU; not equivalent).

    python tests/mutation_report.py --out bench/results/mutation.md [--seconds S] [PATTERN...]

Reads mutmut's results under mutants/ (run from the repository root); PATTERNs are the
mutant-name patterns ``mutmut run`` was given (fnmatch, as mutmut reads them): mutants of the
other functions of a mutated file are left out. Only mutmut's ``killed`` counts as killed:
a ``timeout`` (the tests outran their time limit, which on a loaded machine need not mean
that they would have failed), ``survived`` and ``no tests`` count against the score,
justified or not; mutants an interrupted run did not reach (``not checked``) are counted
apart. The mutation score proper leaves the equivalent mutants out (killed over checked less
the survivors docs/mutation-survivors.md justifies as equivalent): no test can kill those.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.__main__ import SourceFileMutationData, walk_mutatable_files
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

JUSTIFICATIONS = Path("docs/mutation-survivors.md")
DETECTED = ("killed",)
ROW = re.compile(r"^\|\s*`(?P<name>[^`]+)`\s*\|.*\|\s*(?P<why>[^|]+?)\s*\|\s*$")
EQUIVALENT, GPU_ONLY = "equivalent", "observable only on a GPU"
SAYS = {EQUIVALENT: "Equivalent", GPU_ONLY: "Not equivalent, observable only on a GPU"}


def justifications(path: Path = JUSTIFICATIONS) -> dict[str, tuple[str, str]]:
    """mutant name -> (kind, why): the table rows of docs/mutation-survivors.md; the kind is
    ``GPU_ONLY`` below a heading that names it, ``EQUIVALENT`` elsewhere."""
    if not path.exists():
        return {}
    found, kind = {}, EQUIVALENT
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            kind = GPU_ONLY if GPU_ONLY.lower() in line.lower() else EQUIVALENT
        match = ROW.match(line)
        if match:
            found[match["name"]] = (kind, match["why"])
    return found


def results(patterns: list[str]) -> dict[str, dict[str, str]]:
    """module -> mutant name -> status, for the mutants the patterns select."""
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        for name, exit_code in data.exit_code_by_key.items():
            if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            module = re.sub(r"\.x[^.]*__mutmut_\d+$", "", name)
            by_module[module][name] = status_by_exit_code[exit_code]
    return dict(sorted(by_module.items()))


def _counts(statuses: dict[str, str], reasons: dict[str, tuple[str, str]]) -> tuple[int, int, int]:
    """(checked, killed, equivalent): the mutants a run reached, those the tests killed, and
    the survivors among them that docs/mutation-survivors.md justifies as equivalent."""
    checked = [n for n, s in statuses.items() if s != "not checked"]
    killed = sum(statuses[n] in DETECTED for n in checked)
    equivalent = sum(
        statuses[n] not in DETECTED and reasons.get(n, ("",))[0] == EQUIVALENT for n in checked
    )
    return len(checked), killed, equivalent


def score_line(statuses: dict[str, str]) -> str:
    """``N of M killed (x %)`` over the checked mutants; how many were not checked."""
    checked, killed, _ = _counts(statuses, {})
    line = f"{killed} of {checked} killed ({100 * killed / max(checked, 1):.1f} %)"
    if checked < len(statuses):
        line += f"; {len(statuses) - checked} of {len(statuses)} not checked"
    return line


def mutation_score(statuses: dict[str, str], reasons: dict[str, tuple[str, str]]) -> str:
    """``x %``: killed over the checked mutants that are not justified as equivalent."""
    checked, killed, equivalent = _counts(statuses, reasons)
    return f"{100 * killed / max(checked - equivalent, 1):.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="*")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=int, help="wall time of the mutmut run")
    parser.add_argument("--jobs", type=int, help="mutants tested side by side")
    args = parser.parse_args()

    by_module = results(args.patterns)
    reasons = justifications()
    everything = {name: s for statuses in by_module.values() for name, s in statuses.items()}
    not_checked = [name for name, s in everything.items() if s == "not checked"]
    lines = ["# Mutation testing: surviving mutants", ""]
    if args.seconds is not None:
        jobs = f", {args.jobs} mutants side by side" if args.jobs else ""
        lines += [f"mutmut run: {args.seconds / 60:.1f} minutes of wall time{jobs}.", ""]
    lines += [
        "| module | killed | score without the equivalent | not killed (explained) |",
        "|---|---|---|---|",
    ]
    for module, statuses in by_module.items():
        survivors = [n for n, s in statuses.items() if s not in (*DETECTED, "not checked")]
        justified = sum(n in reasons for n in survivors)
        lines.append(
            f"| `{module}` | {score_line(statuses)} | {mutation_score(statuses, reasons)} "
            f"| {len(survivors)} ({justified}) |"
        )
    total = f"**{score_line(everything)}** | **{mutation_score(everything, reasons)}**"
    lines += [f"| **all** | {total} | |", ""]
    if not_checked:
        lines += [f"{len(not_checked)} mutants were not checked (an interrupted run).", ""]
    counts = Counter(s for s in everything.values() if s not in (*DETECTED, "not checked"))
    if counts:
        lines += ["Not killed: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ""]

    unexplained = []
    for module, statuses in by_module.items():
        survivors = sorted(
            (n for n, s in statuses.items() if s not in (*DETECTED, "not checked")),
            key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)],
        )
        if not survivors:
            continue
        lines += [f"## {module}", ""]
        for name in survivors:
            kind, why = reasons.get(name, (None, None))
            if why is None:
                unexplained.append(name)
            lines += [
                f"### `{name}` ({statuses[name]})",
                "",
                f"{SAYS[kind]}: {why}" if why else "**Not justified: kill it with a test.**",
                "",
                "```diff",
                get_diff_for_mutant(name).strip(),
                "```",
                "",
            ]
    stale = sorted(n for n in reasons if n in everything and everything[n] in DETECTED)
    if stale:
        lines += ["## Justified in docs/mutation-survivors.md but now killed", ""]
        lines += [f"- `{name}`" for name in stale] + [""]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[: lines.index("") + 1 + len(by_module) + 4]))
    print(f"report: {args.out}; {len(unexplained)} survivors without a justification")


if __name__ == "__main__":
    main()
