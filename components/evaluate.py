"""KFP component `evaluate`: a thin caller of `stages.evaluate.run`.

No `from __future__ import annotations`: KFP reads the real annotations.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def evaluate(
    config: str,
    config_overrides: list,
    base_model: str,
    cost_budget: float,
    validated: Input[Dataset],
    policy: Input[Model],
    reward_model: Input[Model],
    cost_model: Input[Model],
    guard_model: Input[Model],
    evaluation: Output[Artifact],
    report: Output[HTML],
    summary: Output[Markdown],
    metrics: Output[Metrics],
) -> str:
    """Trained vs initial policy, alone and behind the guardrail; the report shows in the run's UI."""
    from pathlib import Path

    from safe_rlhf_v.components import kfp_io
    from safe_rlhf_v.stages import evaluate as stage

    result = stage.run(
        kfp_io.parse_config(config, config_overrides, cost_budget=cost_budget),
        validated.path,
        policy.path,
        reward_model.path,
        cost_model.path,
        guard_model.path,
        evaluation.path,
        base_model=base_model,
        pipeline_run_id=kfp_io.pipeline_run_id(),
    )
    kfp_io.publish_metrics(result, metrics)
    kfp_io.publish_file(Path(result.outputs["report"]), report)
    kfp_io.publish_file(Path(result.outputs["markdown"]), summary)
    return result.to_json()
