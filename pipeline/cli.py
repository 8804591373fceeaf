"""The ``sista`` command line.

sista run STAGE [--variant NAME]   run one stage (a Ray job; see pipeline.launch); pretrain
                                   trains SISTA and every baseline unless given --variant
sista status                       what each stage last produced; @champion and @candidate
sista profile NAME                 params.yaml becomes the base with profiles/NAME.yaml's changes
sista explain IMAGE "REPORT"       heat maps of the report's words on the image (PNG)
sista sweep                        Ray Tune over loss weights (a Ray job: components.stages.sweep)
sista sweep --apply [FILE]         write the sweep's best settings into params.yaml
sista sweep --dvc-args [FILE]      the same settings as `dvc exp run` -S arguments
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from components.platform import profiles
from components.platform.config import ConfigError, load_params
from components.platform.stage import STAGES, stage_dir
from components.platform.stage_storage import read_manifest

from .launch import launch


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
    registry_status(params)
    return 0


def registry_status(params) -> None:
    """The versions holding @champion and @candidate, with their score and lineage (what
    data, params and code produced them) and the promotion gate's decision."""
    import mlflow

    from components.platform.config import tracking_uri
    from components.platform.lineage import TAG_PREFIX

    name = params.mlflow.registered_model
    client = mlflow.MlflowClient(tracking_uri(params))
    try:
        aliases = client.get_registered_model(name).aliases
        versions = {alias: client.get_model_version(name, aliases[alias]) for alias in aliases}
    except mlflow.exceptions.MlflowException as error:
        print(f"\nregistry: {name!r} not readable ({error.error_code})")
        return
    print(f"\nregistry: {name}")
    for alias in ("champion", "candidate"):
        version = versions.get(alias)
        if version is None:
            print(f"  @{alias:10} none")
            continue
        tags = version.tags
        lineage = "  ".join(
            f"{key}={tags.get(TAG_PREFIX + key, '?')}" for key in ("data", "params", "code")
        )
        print(f"  @{alias:10} v{version.version:<4} score={tags.get('score', '?')}  {lineage}")
        if "gate.rule" in tags:
            print(f"  {'':12} gate: promoted={tags.get('gate.promoted')} ({tags['gate.rule']})")


def switch_profile(name: str) -> int:
    """Write profile ``name`` (the base with profiles/NAME.yaml's changes) into params.yaml."""
    try:
        profiles.switch(name, Path.cwd())
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    if name == profiles.BASE:
        print("params.yaml is the base (default profile)")
    else:
        print(f"params.yaml is now the {name} profile: the base with profiles/{name}.yaml")
    return 0


def explain(
    image_path: str, report: str, model_dir: str, out: str | None, words: str | None
) -> int:
    """Write the word heat maps of ``report`` on the image; 2 with one line on any failure."""
    # Imported here: torch and the model take seconds to load, which `status` need not wait for.
    from sista_core import SISTAModel
    from sista_core.checkpoint import CheckpointError
    from sista_core.datasets.base import RecordError
    from sista_core.datasets.images import read_image, resize_uint8
    from sista_core.explain import explain_png

    if not Path(model_dir).is_dir():
        print(f"no model folder at {model_dir}", file=sys.stderr)
        return 2
    if not Path(image_path).is_file():
        print(f"no image at {image_path}", file=sys.stderr)
        return 2
    out_path = Path(out or f"{Path(image_path).stem}_explain.png")
    try:
        model = SISTAModel.from_pretrained(model_dir)
        size = model.image_encoder.config.img_size
        image = resize_uint8(read_image(Path(image_path), image_path), size)
        shown = explain_png(model, image, report, out_path, words.split(",") if words else None)
    except (CheckpointError, RecordError, ValueError, OSError) as error:
        print(error, file=sys.stderr)
        return 2
    print(f"wrote {out_path} ({', '.join(shown)})")
    return 0


def sweep(params_path: str, apply: str | None, dvc_args: str | None, rest: list[str]) -> int:
    """Run the sweep, or apply / print the best settings it wrote."""
    from components.stages.sweep_best import BEST_FILE, apply_best, dvc_arguments

    chosen = apply or dvc_args
    if chosen is None:
        return launch("sweep", params_path, rest)
    if chosen == "-":  # the flag without a file: this params file's sweep output
        try:
            chosen = str(stage_dir(load_params(params_path), "sweep") / BEST_FILE)
        except ConfigError as error:
            print(error, file=sys.stderr)
            return 2
    if not Path(chosen).is_file():
        print(f"no sweep result at {chosen}: run `sista sweep` first", file=sys.stderr)
        return 2
    try:
        if dvc_args:
            print(dvc_arguments(chosen))
            return 0
        changed = apply_best(params_path, chosen)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    for key, (old, new) in changed.items():
        print(f"{key}: {old} -> {new}")
    print(f"{params_path} updated from {chosen}")
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
    heat_maps = commands.add_parser("explain", help="heat maps of a report's words on an image")
    heat_maps.add_argument("image", help="PNG or JPEG radiograph")
    heat_maps.add_argument("report", help="the report text, quoted")
    heat_maps.add_argument("--model", default="data/pretrain/sista/model", help="SISTAModel folder")
    heat_maps.add_argument("--out", help="PNG to write (default: ./IMAGESTEM_explain.png)")
    heat_maps.add_argument("--words", help="comma-separated words (default: the most focused)")
    tuning = commands.add_parser("sweep", help="Ray Tune over loss weights, or apply its result")
    tuning.add_argument("--apply", nargs="?", const="-", metavar="FILE", help="best_params.yaml")
    tuning.add_argument("--dvc-args", nargs="?", const="-", metavar="FILE", help="print -S args")
    args, rest = parser.parse_known_args(argv)
    if args.command == "sweep":
        raise SystemExit(sweep(args.params, args.apply, args.dvc_args, rest))
    if args.command == "run":
        raise SystemExit(launch(args.stage, args.params, rest))
    if args.command == "status":
        raise SystemExit(status(args.params))
    if args.command == "explain":
        raise SystemExit(explain(args.image, args.report, args.model, args.out, args.words))
    raise SystemExit(switch_profile(args.name))


if __name__ == "__main__":
    main()
