"""The ``sista`` command line.

sista run STAGE [--variant NAME]   run one stage (a Ray job; see pipeline.launch)
sista status                       what each stage last produced
sista profile NAME                 switch params.yaml to profiles/NAME.yaml
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from pathlib import Path

from components.artifacts import read_manifest
from components.config import ConfigError, load_params
from components.stage import STAGES, stage_dir

from .launch import launch

PROFILES = Path("profiles")


def status(params_path: str) -> int:
    try:
        params = load_params(params_path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    print(f"{'stage':12} {'state':9} {'finished':20} {'seconds':>8}  mlflow run")
    for stage in STAGES:
        folder = stage_dir(params, stage)
        manifests = (
            [folder] if stage != "pretrain" else sorted(p for p in folder.glob("*") if p.is_dir())
        )
        found = False
        for output in manifests:
            try:
                manifest = read_manifest(output)
            except FileNotFoundError:
                continue
            found = True
            finished = dt.datetime.fromtimestamp((output / "_stage.json").stat().st_mtime)
            name = stage if output == folder else f"{stage}/{output.name}"
            print(
                f"{name:12} {'done':9} {finished:%Y-%m-%d %H:%M:%S}  "
                f"{manifest.get('seconds', 0):>8.1f}  {manifest.get('mlflow_run_id', '')}"
            )
        if not found:
            print(f"{stage:12} {'not run':9}")
    return 0


def switch_profile(name: str) -> int:
    source = PROFILES / f"{name}.yaml"
    if not source.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        print(f"no profile {name!r}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    load_params(source)  # never switch to an invalid file
    shutil.copyfile(source, "params.yaml")
    print(f"params.yaml is now the {name} profile ({source})")
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sista", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one stage")
    run.add_argument("stage", choices=STAGES)
    commands.add_parser("status", help="what each stage last produced")
    profile = commands.add_parser("profile", help="switch params.yaml to a profile")
    profile.add_argument("name")
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        raise SystemExit(launch(args.stage, args.params, rest))
    if args.command == "status":
        raise SystemExit(status(args.params))
    raise SystemExit(switch_profile(args.name))


if __name__ == "__main__":
    main()
