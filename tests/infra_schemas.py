"""Offline validation of the Kubernetes manifests in infra/: core kinds against the strict
schemas that kubernetes-validate ships, KubeRay kinds against the vendored ray.io/v1 schema,
whose Kubernetes references (pod templates, env, resources) resolve to the same strict
schemas."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[1]
KUBERNETES_VERSION = "1.31"  # what the manifests target (EKS, GKE and AKS all offer it)
KUBERAY_SCHEMA = ROOT / "infra" / "schemas" / "kuberay" / "ray.io_v1.schema.yaml"
KUBERAY_KINDS = ("RayCluster", "RayJob")


def manifests() -> list[tuple[Path, dict]]:
    """Every Kubernetes object in infra/ (any YAML document with apiVersion and kind)."""
    found = []
    for path in sorted((ROOT / "infra").rglob("*.yaml")):
        if "schemas" in path.parts:
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and {"apiVersion", "kind"} <= set(document):
                found.append((path, document))
    return found


@cache
def _kuberay_validators() -> dict[str, jsonschema.protocols.Validator]:
    package = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    definitions = json.loads(
        (package / f"v{KUBERNETES_VERSION}.0-local-strict" / "_definitions.json").read_text()
    )
    schema = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    registry = Registry().with_resources(
        [
            (definitions["$id"], Resource.from_contents(definitions)),
            (schema["$id"], Resource.from_contents(schema)),
        ]
    )
    return {
        kind: jsonschema.Draft202012Validator(
            {"$ref": f"{schema['$id']}#/kinds/{kind}"}, registry=registry
        )
        for kind in KUBERAY_KINDS
    }


def validation_errors(document: dict) -> list[str]:
    """Problems of one object, each ``path: message``; empty when it validates."""
    kind = document.get("kind")
    if kind in KUBERAY_KINDS:
        validator = _kuberay_validators()[kind]
        return [
            f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in sorted(validator.iter_errors(document), key=lambda e: e.json_path)
        ]
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path)) or '(top)'}: {error.message}"]
    return []
