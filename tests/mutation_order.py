"""pytest plugin for ``make mutation`` (``-p tests.mutation_order`` in pyproject's
[tool.mutmut]): a mutant's tests run cheapest file first, so that the first failure (mutmut
runs pytest with ``-x``) comes after seconds, not after the multi-process fixtures of the
tests that reach the same function indirectly.

During mutmut's stats run (``MUTANT_UNDER_TEST=stats``) it records each test file's time,
setup and teardown included (mutmut's own stats count only the test calls); during a
mutant's run it orders the test files by that time, keeping each file's own order so that
module fixtures are set up once. Without ``MUTANT_UNDER_TEST`` it does nothing.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

DURATIONS = Path("mutation-durations.json")  # in mutants/, the folder mutmut runs pytest in
_seconds: defaultdict[str, float] = defaultdict(float)


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_runtest_logreport(report) -> None:
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        _seconds[_file_of(report.nodeid)] += report.duration


def pytest_sessionfinish(session) -> None:
    if os.environ.get("MUTANT_UNDER_TEST") == "stats" and _seconds:
        known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        DURATIONS.write_text(json.dumps({**known, **_seconds}, indent=1, sort_keys=True))


def pytest_collection_modifyitems(items) -> None:
    if os.environ.get("MUTANT_UNDER_TEST", "stats") == "stats" or not DURATIONS.exists():
        return
    seconds = json.loads(DURATIONS.read_text())
    first_seen = {}
    for index, item in enumerate(items):
        first_seen.setdefault(_file_of(item.nodeid), index)
    items.sort(
        key=lambda item: (
            seconds.get(_file_of(item.nodeid), float("inf")),
            first_seen[_file_of(item.nodeid)],
        )
    )
