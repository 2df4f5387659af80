"""KFP component `train-guard`: a thin caller of `stages.train_guard.run`.

No `from __future__ import annotations`: KFP reads the real annotations.
"""

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def train_guard(
    config: str,
    config_overrides: list,
    base_model: str,
    validated: Input[Dataset],
    guard: Output[Model],
    metrics: Output[Metrics],
    severity_confusion: Output[ClassificationMetrics],
) -> str:
    """Train Beaver-Guard-V; its severity confusion matrix shows in the run's visualizations."""
    from safe_rlhf_v.components import kfp_io
    from safe_rlhf_v.stages import train_guard as stage

    cfg = kfp_io.parse_config(config, config_overrides)
    run_id = kfp_io.pipeline_run_id()
    result = kfp_io.train_stage(
        cfg,
        "train-guard",
        run_id,
        argv=["train-guard", "--base-model", base_model],
        artifacts={"--data": validated, "--out": guard},
        output=guard,
        in_process=lambda: stage.run(
            cfg, validated.path, guard.path, pipeline_run_id=run_id, base_model=base_model
        ),
    )
    kfp_io.publish_metrics(result, metrics)
    confusion = result.details["confusion"]["severity"]
    severity_confusion.log_confusion_matrix(confusion["labels"], confusion["matrix"])
    guard.metadata.update({"kind": "guard"})
    return result.to_json()
