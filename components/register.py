"""KFP component `register`: a thin caller of `stages.register.run`.

Each input goes to the stage as `kfp_io.artifact_location`: the artifact's `s3://` URI in a cluster,
which is what a registered version must point at (the launcher's `/s3/...` copy is gone with the pod),
and the local folder under `kfp.local`.

No `from __future__ import annotations`: KFP reads the real annotations.
"""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().cpu, install_kfp_package=False)
def register(
    config: str,
    config_overrides: list,
    cost_budget: float,
    policy: Input[Model],
    reward_model: Input[Model],
    cost_model: Input[Model],
    guard_model: Input[Model],
    evaluation: Input[Artifact],
) -> str:
    """Register the run's models in the MLflow Model Registry; the policy version becomes `candidate`."""
    from safe_rlhf_v.components import kfp_io
    from safe_rlhf_v.stages import register as stage

    result = stage.run(
        kfp_io.parse_config(config, config_overrides, cost_budget=cost_budget),
        policy_uri=kfp_io.artifact_location(policy),
        reward_uri=kfp_io.artifact_location(reward_model),
        cost_uri=kfp_io.artifact_location(cost_model),
        guard_uri=kfp_io.artifact_location(guard_model),
        evaluation_uri=kfp_io.artifact_location(evaluation),
        pipeline_run_id=kfp_io.pipeline_run_id(),
    )
    return result.to_json()
