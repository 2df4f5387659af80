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

from typing import Literal

from safe_rlhf_v.config import PipelineConfig, ScoreStageConfig
from safe_rlhf_v.data.augment import with_spliced_pairs
from safe_rlhf_v.records import StageResult
from safe_rlhf_v.stages.context import open_stage, settings_from
from safe_rlhf_v.tracking import log_config
from safe_rlhf_v.train.cost import CostObjective
from safe_rlhf_v.train.preference import Objective, PreferenceSettings, train_preference_model
from safe_rlhf_v.train.reward import RewardObjective

ScoreStage = Literal["train-reward", "train-cost"]


def _objective(stage: ScoreStage, cfg: PipelineConfig) -> tuple[Objective, ScoreStageConfig]:
    if stage == "train-reward":
        section = cfg.train_reward
        return RewardObjective(regularization=section.regularization), section
    section = cfg.train_cost
    return CostObjective(regularization=section.regularization, sign_mode=section.sign_mode), section


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
    base_model = base_model or cfg.base_model
    objective, section = _objective(stage, cfg)
    inputs = {"--data": data_uri, "base model": base_model}
    with open_stage(
        stage, cfg, out_uri, inputs=inputs, pipeline_run_id=pipeline_run_id, distributed=True
    ) as ctx:
        if ctx.main:
            log_config(section, f"{stage}.")
        digests, splits = ctx.load_validated(data_uri)
        train = with_spliced_pairs(splits["train"], section.spliced_negatives, section.train.seed)
        settings = settings_from(
            section,
            PreferenceSettings,
            base_model=ctx.model(base_model),
            trust_remote_code=cfg.trust_remote_code,
        )
        metrics = train_preference_model(
            objective,
            settings,
            train=train,
            evaluation=splits["evaluation"],
            out_dir=ctx.out,
            checkpoint_dir=ctx.checkpoint_dir(),
            checkpoint_key=ctx.checkpoint_key(),
            sink=ctx.log_step,
        ).metrics
        return ctx.finish(
            metrics,
            lineage=ctx.lineage(objective.kind, data_uri=data_uri, digests=digests, base_model=base_model),
            outputs={"model": ctx.out_uri or out_uri},
            files={"metrics.json": metrics},
            artifacts=["metrics.json"],
        )
