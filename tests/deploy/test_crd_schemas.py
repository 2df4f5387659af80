"""Every custom resource the project renders, checked against the upstream API types (Kubeflow
Trainer v2.2.0, KFP 2.5.0) as transcribed in upstream_schemas.yaml, and proof that the check bites:
an unknown (pruned) field or a missing required one fails."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from crd_schema import schema_errors

from safe_rlhf_v.config import ImagesConfig, KubernetesConfig, load_config
from safe_rlhf_v.ops.launch import trainjob_manifest

ROOT = Path(__file__).resolve().parents[2]
TRAINING_STAGES = ("train-reward", "train-cost", "train-guard", "train-ppo-lag")
RUNTIMES = (
    {"trainer_runtime": "torch-distributed"},
    {"trainer_runtime": "safe-rlhf-v-deepspeed"},
    {"trainer_runtime": "deepspeed-distributed"},
    {"trainer_runtime": "team-torch", "trainer_runtime_policy": "torch"},
)


def rendered_trainjobs() -> list[tuple[str, dict[str, Any]]]:
    """What `run_stage` submits for each preset's training stages on 2 nodes, on every runtime kind,
    with GPUs as configured and on CPU nodes."""
    jobs = []
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(preset)
        for stage in TRAINING_STAGES:
            for runtime in RUNTIMES:
                kube = KubernetesConfig.model_validate(cfg.kubernetes.model_dump() | runtime)
                for gpus in {cfg.resources_for(stage).gpus, 0}:
                    resources = cfg.resources_for(stage).model_copy(update={"nodes": 2, "gpus": gpus})
                    job = trainjob_manifest(
                        f"{stage}-abc123",
                        image=cfg.images.gpu,
                        stage_argv=[stage, "--data", "s3://b/run/validated", "--out", "s3://b/run/out"],
                        resources=resources,
                        kube=kube,
                        namespace="ml",
                        config_json=cfg.model_dump_json(),
                        labels={"pipeline/runid": "run-1"},
                    )
                    jobs.append((f"{preset.stem} {stage} {runtime['trainer_runtime']} gpus={gpus}", job))
    return jobs


def kustomize(directory: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{directory} does not render:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


RENDERED = (
    "manifests/base",
    "manifests/base/trainer-runtime",
    "manifests/overlays/dev",
    "manifests/overlays/prod",
    "manifests/overlays/dev/secrets",
    "manifests/overlays/prod/secrets",
)


def runtime() -> dict[str, Any]:
    (doc,) = kustomize("manifests/base/trainer-runtime")
    return doc


def test_every_trainjob_the_launcher_renders_is_a_valid_trainer_v2_2_trainjob() -> None:
    jobs = rendered_trainjobs()
    assert len(jobs) > 50
    problems = {name: errors for name, job in jobs if (errors := schema_errors(job))}
    assert problems == {}


@pytest.mark.parametrize("directory", RENDERED)
def test_everything_kustomize_renders_validates_with_no_kind_skipped(directory: str) -> None:
    docs = kustomize(directory)
    assert docs
    problems = {
        f"{doc['kind']}/{doc['metadata']['name']}": errors for doc in docs if (errors := schema_errors(doc))
    }
    assert problems == {}


def test_no_scheduled_workflow_is_rendered_and_the_old_one_would_be_refused() -> None:
    kinds = {doc["kind"] for directory in RENDERED for doc in kustomize(directory)}
    assert "ScheduledWorkflow" not in kinds and "CronJob" in kinds and "ClusterTrainingRuntime" in kinds
    # The shape the removed manifests had: no `status`, which the KFP 2.5.0 CRD requires.
    removed = {
        "apiVersion": "kubeflow.org/v1beta1",
        "kind": "ScheduledWorkflow",
        "metadata": {"name": "safe-rlhf-v-retrain"},
        "spec": {"enabled": True, "workflow": {"parameters": [{"name": "data_uri", "value": "s3://b/d"}]}},
    }
    assert schema_errors(removed) == ["<root>: 'status' is a required property"]


def test_the_project_runtime_runs_the_project_image_on_every_pod_over_mpi() -> None:
    doc = runtime()
    assert doc["metadata"]["name"] == "safe-rlhf-v-deepspeed" and "namespace" not in doc["metadata"]
    mpi = doc["spec"]["mlPolicy"]["mpi"]
    assert mpi["runLauncherAsNode"] is True and mpi["mpiImplementation"] == "OpenMPI"
    jobs = {job["name"]: job for job in doc["spec"]["template"]["spec"]["replicatedJobs"]}
    assert set(jobs) == {"launcher", "node"}
    # Trainer overrides the image only on the job labelled as the trainer step: the launcher.
    ancestor = "trainer.kubeflow.org/trainjob-ancestor-step"
    assert jobs["launcher"]["template"]["metadata"]["labels"][ancestor] == "trainer"
    assert ancestor not in jobs["node"]["template"].get("metadata", {}).get("labels", {})
    for job in jobs.values():
        (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
        assert container["name"] == "node" and container["image"] == ImagesConfig().gpu
    assert KubernetesConfig(trainer_runtime=doc["metadata"]["name"]).trainer_policy == "mpi"


def without(doc: dict[str, Any], *path: str | int) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return changed


def with_field(doc: dict[str, Any], value: Any, *path: str | int) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return changed


def test_a_pruned_field_or_a_missing_required_one_fails() -> None:
    _, job = rendered_trainjobs()[0]
    patch = ("spec", "runtimePatches", 0)
    pod = (*patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", 0, "template", "spec")
    cases = {
        # Trainer v2.1.0's spelling of the patches: v2.2.0 would prune it.
        "podTemplateOverrides": with_field(
            job, [{"targetJobs": [{"name": "node"}]}], "spec", "podTemplateOverrides"
        ),
        "misspelt numProcPerNode": with_field(job, 8, "spec", "trainer", "numProcsPerNode"),
        "numProcPerNode auto": with_field(job, "auto", "spec", "trainer", "numProcPerNode"),
        "image in a container patch": with_field(
            job, "x:1", *pod, "template", "spec", "containers", 0, "image"
        ),
        "no runtimeRef": without(job, "spec", "runtimeRef"),
        "no runtimeRef name": without(job, "spec", "runtimeRef", "name"),
        "no patch manager": without(job, *patch, "manager"),
        "name not RFC 1035": with_field(job, "Train.Reward", "metadata", "name"),
    }
    doc = runtime()
    cases |= {
        "namespaced runtime": with_field(doc, "ml", "metadata", "namespace"),
        # v2.1.0 kept numProcPerNode on the runtime's torch policy; v2.2.0 has no such field.
        "runtime torch numProcPerNode": with_field(
            doc, {"torch": {"numProcPerNode": "auto"}}, "spec", "mlPolicy"
        ),
        "replicated job without template": without(
            doc, "spec", "template", "spec", "replicatedJobs", 1, "template"
        ),
        "two policies": with_field(doc, {}, "spec", "mlPolicy", "torch"),
    }
    cronjob = next(d for d in kustomize("manifests/overlays/prod") if d["kind"] == "CronJob")
    cases |= {
        "cronjob without schedule": without(cronjob, "spec", "schedule"),
        "cronjob unknown field": with_field(cronjob, 1, "spec", "jobTemplate", "spec", "retries"),
    }
    passing = sorted(name for name, changed in cases.items() if not schema_errors(changed))
    assert passing == []
    assert schema_errors(job) == [] and schema_errors(doc) == [] and schema_errors(cronjob) == []
