"""What every stage's command line shares: parse, validate params before any work, time."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, Params, load_params
from .preflight import check_resources

STAGES = ("ingest", "reports", "similarity", "pretrain", "evaluate", "publish")
# What `python -m pipeline.launch` runs: the DVC stages, and the loss-weight sweep (a Ray job
# over the stages' outputs that `dvc repro` never starts).
JOBS = (*STAGES, "sweep")


def stage_dir(params: Params, stage: str) -> Path:
    """Local folder of a stage's outputs (``<storage.uri>/<stage>``)."""
    if params.storage.uri.startswith("s3://"):
        raise NotImplementedError("s3:// storage for stage outputs is not built yet")
    return Path(params.storage.uri) / stage


def stage_main(
    stage: str,
    run: Callable[[Params, argparse.Namespace], dict[str, Any]],
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict[str, Any]:
    """``python -m components.<stage> [--params params.yaml]``: a config error or a location
    that does not answer exits with status 2 and one line per problem naming the key, before
    Ray or any data is touched."""
    parser = argparse.ArgumentParser(prog=f"python -m components.{stage}")
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
    started = time.perf_counter()
    summary = run(params, args)
    print(f"[{stage}] finished in {time.perf_counter() - started:.1f} s: {summary}", flush=True)
    return summary
