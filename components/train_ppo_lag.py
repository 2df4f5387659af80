"""KFP component `train-ppo-lag`: a thin caller of `stages.train_ppo.run`.

No `from __future__ import annotations`: KFP reads the real annotations.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def train_ppo_lag(
    variant: str,
    config_json: str,
    base_model: str,
    cost_budget: float,
    ppo_max_steps: int,
    pipeline_run_id: str,
    validated: Input[Dataset],
    reward_model: Input[Model],
    cost_model: Input[Model],
    policy: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Fine-tune the policy: PPO-Lagrangian (`safe-rlhf-v`) or an ablation (`reward-only`, `fixed-lambda`)."""
    from safe_rlhf_v.components import kfp_io
    from safe_rlhf_v.stages import train_ppo

    cfg = kfp_io.parse_config(config_json, cost_budget=cost_budget, ppo_max_steps=ppo_max_steps)
    result = kfp_io.train_stage(
        cfg,
        "train-ppo-lag",
        pipeline_run_id,
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
            pipeline_run_id=pipeline_run_id,
            base_model=base_model,
        ),
    )
    kfp_io.publish_metrics(result, metrics)
    policy.metadata.update({"kind": "policy", "variant": variant})
    return result.to_json()
