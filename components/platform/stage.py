"""What every stage's command line shares: parse, validate params and check storage before
any work, pull the stage's inputs from storage, time."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from components.platform.config import ConfigError, Params, StageStopped, load_params
from components.platform.preflight import check_resources
from components.platform.stage_storage import absolute, input_folders, pull, stage_dir
from components.platform.storage import StorageError

STAGES = ("ingest", "reports", "similarity", "pretrain", "evaluate", "publish")
# What `python -m pipeline.launch` runs: the DVC stages, and the loss-weight sweep (a Ray job
# over the stages' outputs that `dvc repro` never starts).
JOBS = (*STAGES, "sweep")
__all__ = ["JOBS", "STAGES", "stage_dir", "stage_main"]


def stage_main(
    stage: str,
    run: Callable[[Params, argparse.Namespace], dict[str, Any]],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict[str, Any]:
    """``python -m components.stages.<stage> [--params params.yaml]``: a config error, or a location
    or storage that does not answer, exits with status 2 and one line per problem naming the
    key, before Ray or any data is touched; a missing input (its stage has not run) with
    status 1; a :class:`StageStopped` (a lost Ray node) with status 1 and its one line."""
    parser = argparse.ArgumentParser(prog=f"python -m components.stages.{stage}")
    parser.add_argument("--params", default="params.yaml", help="parameters file")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        check_resources(params, stage, source=args.params)
    except ConfigError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2) from None
    # Ray tasks and workers run in other folders: give them the same absolute paths.
    params = params.model_copy(update={"storage": absolute(params.storage)})
    from components.platform.tracking import (
        dvc_experiment_store,  # MLflow: imported by stages, not by the CLI
    )

    params = dvc_experiment_store(params)  # a queued `dvc exp run`: the repository's MLflow
    try:
        pull(params.storage, input_folders(params, stage))
    except StorageError as error:
        print(error, file=sys.stderr)
        raise SystemExit(1) from None
    started = time.perf_counter()
    try:
        summary = run(params, args)
    except StageStopped as error:
        print(f"[{stage}] stopped: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    print(f"[{stage}] finished in {time.perf_counter() - started:.1f} s: {summary}", flush=True)
    return summary
