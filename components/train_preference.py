"""KFP component for `train-reward` and `train-cost`: a thin caller of `stages.train_score.run`.

One component serves both stages (they differ only by `stage`), so the pipeline holds two tasks of it.
No `from __future__ import annotations`: KFP reads the real annotations.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def train_preference_model(
    stage: str,
    config_json: str,
    base_model: str,
    pipeline_run_id: str,
    validated: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Train the reward (stage `train-reward`) or cost (`train-cost`) model on the validated data."""
    from safe_rlhf_v.components import kfp_io
    from safe_rlhf_v.stages import train_score

    cfg = kfp_io.parse_config(config_json)
    result = kfp_io.train_stage(
        cfg,
        stage,
        pipeline_run_id,
        argv=[stage, "--base-model", base_model],
        artifacts={"--data": validated, "--out": model},
        output=model,
        in_process=lambda: train_score.run(
            stage, cfg, validated.path, model.path, pipeline_run_id=pipeline_run_id, base_model=base_model
        ),
    )
    kfp_io.publish_metrics(result, metrics)
    model.metadata.update({"kind": stage.removeprefix("train-"), **result.details.get("lineage", {})})
    return result.to_json()
