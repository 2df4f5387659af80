"""Glue between KFP artifacts and stage results, shared by every component.

Component functions ship to the cluster as source only, so they import this module from the
installed package inside their body instead of referring to module-level names.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safe_rlhf_v.config import PipelineConfig, config_from_dict
from safe_rlhf_v.records import RESULT_FILE, StageResult


def parse_config(
    config_json: str, *, cost_budget: float | None = None, ppo_max_steps: int = 0
) -> PipelineConfig:
    """The pipeline config travels as one JSON string parameter, validated again on arrival.

    `cost_budget` (the harm budget d) and `ppo_max_steps` are separate pipeline parameters because
    they are what people change most in the Kubeflow UI form; they override the config's values
    (`ppo_max_steps` 0 keeps the config's epochs).
    """
    overrides = []
    if cost_budget is not None:
        overrides.append(f"train_ppo_lag.lagrangian.threshold={float(cost_budget)!r}")
    if ppo_max_steps:
        overrides.append(f"train_ppo_lag.actor.max_steps={int(ppo_max_steps)}")
    if not overrides:
        return PipelineConfig.model_validate_json(config_json)
    return config_from_dict(json.loads(config_json), "pipeline parameter config_json", overrides)


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
    pipeline_run_id: str,
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
    `result.json` in the output folder.
    """
    from safe_rlhf_v import storage
    from safe_rlhf_v.ops import launch

    resources = cfg.resources_for(stage)
    mode = launch.launch_mode(resources)
    if mode == "in-process":
        return in_process()
    common = {"image": cfg.images.gpu, "stage": stage, "run_id": pipeline_run_id}
    run_argv = [*argv, "--pipeline-run-id", pipeline_run_id]
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
