"""Validate rendered objects offline: custom resources against `upstream_schemas.yaml` (written from
the upstream API types it cites), everything else against the Kubernetes schemas kubernetes-validate
bundles. Nothing is skipped: a kind with no schema is an error."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

SCHEMAS = Path(__file__).with_name("upstream_schemas.yaml")
# The oldest Kubernetes current Kubeflow releases support, and the newest schemas bundled.
KUBERNETES_VERSIONS = ("1.31.0", kubernetes_validate.utils.latest_version())
CUSTOM_KINDS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "TrainJob",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "ClusterTrainingRuntime",
    ("kubeflow.org/v1beta1", "ScheduledWorkflow"): "ScheduledWorkflow",
}
"""(apiVersion, kind) -> the $def of upstream_schemas.yaml that describes it."""


@functools.cache
def _validator(definition: str) -> jsonschema.Draft202012Validator:
    """The custom resource's schema; core types resolve to the strict schemas of the oldest version."""
    schemas = yaml.safe_load(SCHEMAS.read_text(encoding="utf-8"))
    directory = f"v{KUBERNETES_VERSIONS[0]}-local-strict"
    core = json.loads(
        (
            Path(kubernetes_validate.__file__).parent
            / "kubernetes-json-schema"
            / directory
            / "_definitions.json"
        ).read_text(encoding="utf-8")
    )
    registry: Registry = Resource.from_contents(core) @ Registry()
    registry = Resource.from_contents(schemas) @ registry
    schema = {"$schema": schemas["$schema"], "$ref": f"{schemas['$id']}#/$defs/{definition}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every reason the API server would reject or silently prune `doc`, as `path: message` lines."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_KINDS:
        validator = _validator(CUSTOM_KINDS[key])
        return [
            f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
            for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{'.'.join(str(p) for p in error.absolute_path)} ({version}): {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"no schema ({version}): {error.message}")
    return errors
