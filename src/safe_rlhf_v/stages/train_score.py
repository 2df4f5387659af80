"""Stages `train-reward` and `train-cost`: a preference model trained on the validated data.

Both stages are this one function with a different objective and config section. Every rank of a
`torchrun` job calls it; rank 0 alone tracks to MLflow and publishes the model folder:

    <out>/                 a Hugging Face model folder + score head (loads with ScoreModel.load)
        score_head.safetensors, score_config.json, processor files
        lineage.json       data digests, base model digest, pipeline run
        metrics.json       final evaluation metrics
        result.json        the stage result
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import mlflow

from safe_rlhf_v import tracking
from safe_rlhf_v.config import PipelineConfig, ScoreStageConfig
from safe_rlhf_v.data.augment import with_spliced_pairs
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.stages.common import RESULT_FILE, StageResult, local_model, staged_output, write_json
from safe_rlhf_v.stages.lineage import dataset_digests, model_digest, validated_dataset_uri, write_lineage
from safe_rlhf_v.train.cost import CostObjective
from safe_rlhf_v.train.distributed import init_distributed
from safe_rlhf_v.train.integrity import checkpoint_key
from safe_rlhf_v.train.preference import Objective, PreferenceSettings, train_preference_model
from safe_rlhf_v.train.reward import RewardObjective

ScoreStage = Literal["train-reward", "train-cost"]


def _objective(stage: ScoreStage, cfg: PipelineConfig) -> tuple[Objective, ScoreStageConfig]:
    if stage == "train-reward":
        section = cfg.train_reward
        return RewardObjective(regularization=section.regularization), section
    section = cfg.train_cost
    return CostObjective(regularization=section.regularization, sign_mode=section.sign_mode), section


def checkpoint_dir(cfg: PipelineConfig, pipeline_run_id: str, stage: str) -> Path:
    """Where a stage keeps its resume checkpoints: stable across retries of the same pipeline run."""
    return Path(cfg.work_dir) / "checkpoints" / pipeline_run_id / stage


def run(
    stage: ScoreStage,
    cfg: PipelineConfig,
    data_uri: str,
    out_uri: str,
    *,
    pipeline_run_id: str | None = None,
    base_model: str | None = None,
) -> StageResult:
    """Train the stage's preference model on validate-data's output at `data_uri`; publish to `out_uri`."""
    dist = init_distributed()
    main = dist.rank == 0
    pipeline_run_id = pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}"
    base_model = base_model or cfg.base_model
    objective, section = _objective(stage, cfg)
    digests = dataset_digests(data_uri)
    cache = Path(cfg.work_dir) / "cache" / "data"
    splits = {split: load_split(validated_dataset_uri(data_uri), split, cache_dir=cache) for split in digests}
    splits["train"] = with_spliced_pairs(splits["train"], section.spliced_negatives, section.train.seed)
    settings = PreferenceSettings(
        base_model=local_model(base_model, cfg.work_dir),
        train=section.train,
        max_length=section.max_length,
        eval_batch_size=section.eval_batch_size,
        freeze_vision_tower=section.freeze_vision_tower,
        freeze_projector=section.freeze_projector,
        min_response_tokens=section.min_response_tokens,
        trust_remote_code=cfg.trust_remote_code,
    )
    run_context = (
        tracking.stage_run(stage, pipeline_run_id, cfg.tracking, cfg.work_dir)
        if main
        else contextlib.nullcontext()
    )
    with run_context as mlrun:
        outputs = staged_output(out_uri) if main else contextlib.nullcontext()
        with outputs as out:
            if main:
                tracking.log_config(section, f"{stage}.")
                mlflow.log_param("base_model", base_model)
                for split, sha in digests.items():
                    tracking.log_dataset(
                        name=f"beavertails-v/{split}",
                        source_uri=validated_dataset_uri(data_uri),
                        sha256=sha,
                        context="training" if split == "train" else "evaluation",
                        rows=len(splits[split]),
                    )
            metrics = train_preference_model(
                objective,
                settings,
                train=splits["train"],
                evaluation=splits["evaluation"],
                out_dir=out,
                checkpoint_dir=checkpoint_dir(cfg, pipeline_run_id, stage),
                checkpoint_key=checkpoint_key(cfg.work_dir),
                sink=lambda values, step: mlflow.log_metrics(values, step=step),
            ).metrics
            if not main:
                return StageResult(stage=stage, status="succeeded", metrics=metrics)
            base_sha = model_digest(base_model)
            lineage = {
                "stage": stage,
                "kind": objective.kind,
                "pipeline_run_id": pipeline_run_id,
                "data_uri": data_uri,
                "data_sha256": digests,
                "base_model": base_model,
                "base_model_sha256": base_sha,
                "mlflow_run_id": mlrun.info.run_id,
            }
            write_lineage(out, lineage)
            write_json(out / "metrics.json", metrics)
            tracking.log_model_reference("input.base_model", base_model, base_sha)
            result = StageResult(
                stage=stage,
                status="succeeded",
                metrics=metrics,
                outputs={"model": out_uri},
                details={"lineage": lineage},
                mlflow_run_id=mlrun.info.run_id,
                pipeline_run_id=pipeline_run_id,
            )
            write_json(out / RESULT_FILE, asdict(result))
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(out / "metrics.json"), artifact_path=stage)
        tracking.log_model_reference(f"output.{objective.kind}_model", out_uri, model_digest(out_uri))
    return result
