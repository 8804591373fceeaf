"""The Tune trainable of the evaluate stage's cells, in a module that imports nothing heavy.

Tune starts a trial actor by importing the trainable's module, and it hands a finished
cell's actor the next cell at once (``reuse_actors``), removing the actor it was starting
for that cell. A cell takes about a second; importing torch and the heads takes about ten
on 2 cores. With those imports at module level every actor but the first was removed while
it started (measured: 12 actors started and 1 ran all 36 cells, with 4 slots), so the cells
ran one at a time beside a churn of half-started processes. Imported here, the actors start
in a moment and each pays the import once, in its first cell. The stage also keeps its
other Ray tasks out of the way while the cells start, so that every slot gets its actor.
"""

from __future__ import annotations

from typing import Any


def evaluation_cell(config: dict[str, Any]) -> None:
    """One cell (task x init x label fraction x seed): ``evaluation_cells.run_cell``."""
    from components.stages.evaluation_cells import run_cell

    run_cell(config)
