"""The sweep's result as settings a user applies: ``best_params.yaml`` holds dotted
``params.yaml`` keys (what ``dvc exp run -S`` takes) with a header saying which sweep chose
them. Light imports: ``sista sweep --apply`` needs neither Ray nor torch."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import yaml

from components.platform.config import ConfigError, load_params, params_from_text

BEST_FILE = "best_params.yaml"


def best_file_text(chosen: dict[str, Any], summary: dict[str, Any]) -> str:
    """``best_params.yaml``: dotted keys with a header saying which sweep chose them and why."""
    header = [
        f"# Chosen by sista sweep, MLflow parent run {summary['parent_run_id']}, "
        f"{summary['date']}: the {summary['decision']} values",
        f"# {summary['reason']}",
    ]
    current = summary.get("current")
    if current:
        sd = "" if current["sd"] is None else f" sd {current['sd']:.4f}"
        header.append(
            f"# current values: {summary['metric']} mean {current['mean']:.4f}{sd} over "
            f"seeds {', '.join(map(str, current['seeds']))}"
        )
    if summary.get("best_trial_id"):
        header.append(
            f"# best sampled trial {summary['best_trial_id']}: {summary['best_signal']:.4f} "
            f"after {summary['total_steps']} steps (validation split)"
        )
    header.append("# apply: sista sweep --apply, or dvc exp run $(sista sweep --dvc-args)")
    body = yaml.safe_dump(chosen["settings"], sort_keys=False, default_flow_style=False)
    return "\n".join(header) + "\n" + body


def read_best(path: str | Path) -> dict[str, float]:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected dotted keys with values")
    return data


def apply_best(params_path: str | Path, best_path: str | Path) -> dict[str, tuple[Any, Any]]:
    """Write the best settings into ``params_path`` in place, keeping its comments and layout
    (ruamel round trip, as ``dvc exp run -S`` does), only if the result validates.
    Returns ``{key: (old, new)}``."""
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    best = read_best(best_path)
    space = load_params(params_path).sweep.space
    for key, value in best.items():  # a best file only sets what the sweep searched
        if key not in space:
            raise ConfigError(f"{best_path}: {key}: not a swept key (sweep.space)")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{best_path}: {key}: {value!r} is not a number")
    editor = YAML()
    editor.preserve_quotes = True
    document = editor.load(params_path.read_text())
    changed = {}
    for key, value in best.items():
        *parents, leaf = key.split(".")
        section = document
        for name in parents:
            if name not in section:
                raise ConfigError(f"{best_path}: {key}: {params_path} has no {name!r}")
            section = section[name]
        changed[key] = (section.get(leaf), value)
        section[leaf] = value
    text = io.StringIO()
    editor.dump(document, text)
    params_from_text(text.getvalue(), source=str(params_path))  # never write an invalid one
    params_path.write_text(text.getvalue())
    return changed


def dvc_arguments(best_path: str | Path) -> str:
    """``-S key=value ...`` for ``dvc exp run``."""
    return " ".join(f"-S {key}={value}" for key, value in read_best(best_path).items())
