"""Profiles: ``params.yaml`` is the base (the default profile) and ``profiles/NAME.yaml``
lists only what profile NAME changes. ``sista profile NAME`` writes the base with those
changes into ``params.yaml`` (comments kept, validated) and keeps the base beside it in
``params.base.yaml`` until ``sista profile default`` puts it back. Light imports: the CLI
uses it."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

from components.platform.config import (
    ROOT,
    SAVED_BASE,
    ConfigError,
    Params,
    Section,
    base_path,
    params_from_text,
    params_mapping,
    profile_merge,
    section_of,
)

BASE = "default"


def known(root: Path = ROOT) -> list[str]:
    return [BASE, *sorted(p.stem for p in (root / "profiles").glob("*.yaml"))]


def overlay_path(name: str, root: Path = ROOT) -> Path:
    path = root / "profiles" / f"{name}.yaml"
    if name == BASE or not path.is_file():
        raise ConfigError(f"no profile {name!r}; known: {', '.join(known(root))}")
    return path


def _mapping(path: Path) -> dict[str, Any]:
    return params_mapping(path.read_text(), str(path))


def profile_data(name: str, root: Path = ROOT) -> dict[str, Any]:
    """Profile ``name`` as one params mapping: the base with the profile's changes."""
    base = _mapping(base_path(root))
    return base if name == BASE else profile_merge(base, _mapping(overlay_path(name, root)))


def _apply(document: Any, overlay: dict[str, Any], kind: type[Section]) -> None:
    """``profile_merge`` on ruamel's round-trip document, so the base's comments stay."""
    for key, value in overlay.items():
        section = section_of(kind, key)
        if section and isinstance(value, dict) and isinstance(document.get(key), dict):
            _apply(document[key], value, section)
        else:
            document[key] = value
            _drop_line_comment(document, key)


def _drop_line_comment(document: Any, key: str) -> None:
    """The comment at the end of ``key``'s line described the base's value; the comment lines
    below it (ruamel keeps them in the same token) stay."""
    tokens = document.ca.items.get(key)
    if not tokens or len(tokens) < 3 or tokens[2] is None:
        return
    _, _, below = tokens[2].value.partition("\n")
    if below.strip():
        tokens[2].value = "\n" + below
    else:
        tokens[2] = None


def profile_text(name: str, root: Path = ROOT) -> str:
    """``params.yaml`` for profile ``name``: the base's text with the profile's values."""
    from ruamel.yaml import YAML

    base = base_path(root).read_text()
    if name == BASE:
        return base
    overlay = overlay_path(name, root)
    editor = YAML()
    editor.preserve_quotes = True
    editor.width = 100
    editor.default_flow_style = None  # lists of numbers on one line, as in the base
    editor.representer.add_representer(
        type(None), lambda writer, _: writer.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    document = editor.load(base)
    _apply(document, _mapping(overlay), Params)
    out = io.StringIO()
    out.write(
        f"# Profile {name}: the base (params.base.yaml) with the changes of profiles/{name}.yaml,\n"
        f"# written by `sista profile {name}`; `sista profile default` puts the base back.\n"
    )
    editor.dump(document, out)
    return out.getvalue()


def switch(name: str, root: Path = ROOT) -> Path:
    """Make ``params.yaml`` profile ``name`` (validated before anything is written)."""
    params, saved = root / "params.yaml", root / SAVED_BASE
    text = profile_text(name, root)
    params_from_text(text, source=f"profile {name} (base + profiles/{name}.yaml)")
    if name == BASE:
        if saved.is_file():
            shutil.move(saved, params)
        return params
    if not saved.is_file():
        shutil.copyfile(params, saved)
    params.write_text(text)
    return params
