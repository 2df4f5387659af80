"""Glue between KFP artifacts and stage results, shared by every component.

Component functions ship to the cluster as source only, so they import this module from the
installed package inside their body instead of referring to module-level names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safe_rlhf_v.config import PipelineConfig, resolve_config
from safe_rlhf_v.records import RESULT_FILE, StageResult

RUN_ID_ENV = "KFP_RUN_ID"
"""The pipeline run's id: on a cluster from the pod's `pipeline/runid` label (the Downward API), under
kfp.local from the local runner's environment."""


def pipeline_run_id() -> str | None:
    """The id of the pipeline run this task belongs to (None outside a pipeline run).

    It comes from the environment, not from a task input, so the tasks KFP may serve from its
    cache keep a cache key that does not change with every run.
    """
    return os.environ.get(RUN_ID_ENV) or None


def parse_config(
    config: str, overrides: list[str], *, cost_budget: float | None = None, ppo_max_steps: int = 0
) -> PipelineConfig:
    """The run's config from the `config` (preset, `s3://` URI or file) and `config_overrides`
    pipeline parameters, validated on arrival.

    `cost_budget` (the harm budget d) and `ppo_max_steps` are separate pipeline parameters because
    they are what people change most in the Kubeflow UI form; they override the config's values
    (`ppo_max_steps` 0 keeps the config's epochs).
    """
    extra = []
    if cost_budget is not None:
        extra.append(f"train_ppo_lag.lagrangian.threshold={float(cost_budget)!r}")
    if ppo_max_steps:
        extra.append(f"train_ppo_lag.actor.max_steps={int(ppo_max_steps)}")
    return resolve_config(config, [*overrides, *extra])


def publish_metrics(result: StageResult, metrics) -> None:
    """Copy the stage's headline figures into the KFP Metrics artifact (shown in the run's UI)."""
    for name, value in sorted(result.metrics.items()):
        metrics.log_metric(name, float(value))


def publish_file(source: Path, artifact) -> None:
    """Copy one file into a KFP artifact (HTML, Markdown, ...) so the UI shows it."""
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, artifact.path)


def artifact_location(artifact) -> str:
    """Where an input artifact lives: its `s3://` URI in a cluster (what the registry records as a
    version's source), else the local path kfp.local hands over."""
    uri = getattr(artifact, "uri", "") or ""
    return uri if uri.startswith("s3://") else artifact.path


def train_stage(
    cfg: PipelineConfig,
    stage: str,
    pipeline_run_id: str | None,
    *,
    argv: list[str],
    artifacts: dict[str, Any],
    output: Any,
    in_process: Callable[[], StageResult],
) -> StageResult:
    """Run a training stage the way its resources ask: in this process (one GPU or none), with
    torchrun across this pod's GPUs, or as a multi-node Kubeflow Trainer `TrainJob`.

    `argv` is the stage's CLI subcommand and plain options; `artifacts` maps path options
    (`--data`, `--out`, ...) to KFP artifacts. torchrun ranks share this pod, so they get local
    paths and a config file; TrainJob pods do not, so they get the artifacts' `s3://` URIs and the
    config as JSON, and the finished output is fetched back into `output.path` so KFP's launcher
    uploads the same folder it would after an in-process run. Every path ends with the stage's
    `result.json` in the output folder. Launched ranks need a run id to share checkpoints and to
    name a TrainJob, so a task outside a pipeline run gets a fresh one, as the stage would.
    """
    from safe_rlhf_v import storage
    from safe_rlhf_v.ops import launch

    resources = cfg.resources_for(stage)
    mode = launch.launch_mode(resources)
    if mode == "in-process":
        return in_process()
    run_id = pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}"
    common = {"image": cfg.images.gpu, "stage": stage, "run_id": run_id}
    run_argv = [*argv, "--pipeline-run-id", run_id]
    if mode == "torchrun":
        with tempfile.TemporaryDirectory(prefix="config-") as scratch:
            config_path = Path(scratch) / "config.json"
            config_path.write_text(cfg.model_dump_json())
            paths = [item for flag, a in artifacts.items() for item in (flag, a.path)]
            code = launch.run_stage(
                [*run_argv, *paths, "--config", str(config_path)], resources, cfg.kubernetes, **common
            )
    else:
        uris = [item for flag, a in artifacts.items() for item in (flag, a.uri)]
        code = launch.run_stage(
            [*run_argv, *uris], resources, cfg.kubernetes, config_json=cfg.model_dump_json(), **common
        )
        if code == 0:
            storage.download(output.uri, Path(output.path))
    if code != 0:
        raise RuntimeError(f"{stage}: the {mode} launch exited with status {code}; see the log above")
    return StageResult.from_json((Path(output.path) / RESULT_FILE).read_text())


def score_task(
    stage: str, config: str, config_overrides: list[str], base_model: str, validated, model, metrics
) -> str:
    """The body of the `train-reward` and `train-cost` components, which differ only by `stage`:
    two components instead of one used twice, so the Kubeflow UI names each after its stage."""
    from safe_rlhf_v.stages import train_score

    cfg = parse_config(config, config_overrides)
    run_id = pipeline_run_id()
    result = train_stage(
        cfg,
        stage,
        run_id,
        argv=[stage, "--base-model", base_model],
        artifacts={"--data": validated, "--out": model},
        output=model,
        in_process=lambda: train_score.run(
            stage, cfg, validated.path, model.path, pipeline_run_id=run_id, base_model=base_model
        ),
    )
    publish_metrics(result, metrics)
    model.metadata.update({"kind": stage.removeprefix("train-"), **result.details.get("lineage", {})})
    return result.to_json()


def ppo_task(
    variant: str,
    config: str,
    config_overrides: list[str],
    base_model: str,
    cost_budget: float,
    ppo_max_steps: int,
    validated,
    reward_model,
    cost_model,
    policy,
    metrics,
) -> str:
    """The body of the `train-ppo-lag` and `train-ppo-lag-ablation` components: two components so
    the UI tells the Safe RLHF-V policy from the ablations trained beside it."""
    from safe_rlhf_v.stages import train_ppo

    cfg = parse_config(config, config_overrides, cost_budget=cost_budget, ppo_max_steps=ppo_max_steps)
    run_id = pipeline_run_id()
    result = train_stage(
        cfg,
        "train-ppo-lag",
        run_id,
        argv=["train-ppo-lag", "--variant", variant, "--policy", base_model],
        artifacts={
            "--data": validated,
            "--reward-model": reward_model,
            "--cost-model": cost_model,
            "--out": policy,
        },
        output=policy,
        in_process=lambda: train_ppo.run(
            cfg,
            validated.path,
            reward_model.path,
            cost_model.path,
            policy.path,
            variant=variant,
            pipeline_run_id=run_id,
            base_model=base_model,
        ),
    )
    publish_metrics(result, metrics)
    policy.metadata.update({"kind": "policy", "variant": variant})
    return result.to_json()
