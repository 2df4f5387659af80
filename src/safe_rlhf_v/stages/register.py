"""Stage `register`: the run's policy, reward, cost and guard models into the MLflow Model Registry.

The stage reads the four model folders and the evaluation's result and writes nothing to them; its
output is registry state (versions, tags, the `candidate` alias) plus its own MLflow run, which
records which folders (URIs and digests) became which versions, takes the four logged models as its
MLflow 3 model inputs and links the versions in its description and the pipeline run's.
"""

from __future__ import annotations

from dataclasses import asdict

import mlflow
from mlflow.entities import LoggedModelInput
from mlflow.tracking import MlflowClient

from safe_rlhf_v import registry, storage, tracking
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.records import StageResult
from safe_rlhf_v.stages.context import open_stage

STAGE = "register"


def publish(cfg: PipelineConfig, pipeline_run_id: str, uris: dict[str, str]) -> dict[str, str]:
    """Where each folder is registered from: copied under `registry.publish_uri` when that is set and
    the folder is local (kfp.local's run folders are scratch space), else where it already is."""
    root = cfg.registry.publish_uri
    if not root:
        return uris
    published = {}
    for role, uri in uris.items():
        if storage.is_s3(uri):
            published[role] = uri
            continue
        target = f"{root.rstrip('/')}/{pipeline_run_id}/{role}"
        storage.copy(uri, target)
        published[role] = target
    return published


def run(
    cfg: PipelineConfig,
    *,
    policy_uri: str,
    reward_uri: str,
    cost_uri: str,
    guard_uri: str,
    evaluation_uri: str,
    pipeline_run_id: str | None = None,
) -> StageResult:
    """Register the run's models (by content: no bytes twice) and point `candidate` at the policy version.

    The registration belongs to the pipeline run that trained the policy (from its lineage), so a
    registration from the command line nests under that run in MLflow; a `pipeline_run_id` naming
    another run is refused before anything is logged or published.
    """
    pipeline_run_id = registry.registration_run_id(policy_uri, evaluation_uri, pipeline_run_id)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking, cfg.work_dir)
    with (
        tracking.tracking_errors(tracking_uri),
        open_stage(STAGE, cfg, None, inputs={}, pipeline_run_id=pipeline_run_id) as ctx,
    ):
        tracking.log_config(cfg.registry, f"{STAGE}.")
        uris = publish(
            cfg,
            pipeline_run_id,
            {"policy": policy_uri, "reward": reward_uri, "cost": cost_uri, "guard": guard_uri},
        )
        refs = registry.register_run_models(
            cfg,
            policy_uri=uris["policy"],
            reward_uri=uris["reward"],
            cost_uri=uris["cost"],
            guard_uri=uris["guard"],
            evaluation_uri=evaluation_uri,
            pipeline_run_id=pipeline_run_id,
        )
        for role, ref in refs.items():
            tracking.log_model_reference(f"input.{role}", ref.source, ref.model_sha256)
        description = f"Registered: {registry.version_links(refs)}."
        mlflow.set_tag(tracking.NOTE_TAG, description)
        logged = [LoggedModelInput(ref.model_id) for ref in refs.values() if ref.model_id]
        MlflowClient().log_inputs(mlflow.active_run().info.run_id, models=logged)
        versions = {role: asdict(ref) | {"uri": ref.uri} for role, ref in refs.items()}
        mlflow.log_dict(versions, f"{STAGE}/registered_models.json")
        created = sum(ref.created for ref in refs.values())
        result = ctx.finish(
            {"created_versions": float(created)},
            outputs={role: ref.uri for role, ref in refs.items()},
            details={"versions": versions, "candidate_alias": cfg.registry.candidate_alias},
        )
        tracking.finish_pipeline(
            mlflow.active_run().info.experiment_id,
            pipeline_run_id,
            registry.read_evaluation(evaluation_uri).metrics,
            description,
        )
    return result
