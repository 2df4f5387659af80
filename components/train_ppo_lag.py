"""KFP components `train-ppo-lag` and `train-ppo-lag-ablation`: thin callers of `stages.train_ppo.run`.

They share one body (`kfp_io.ppo_task`); the ablation branch has its own component so the compiled
pipeline and the Kubeflow UI tell it from the Safe RLHF-V policy that is evaluated and registered.
No `from __future__ import annotations`: KFP reads the real annotations.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def train_ppo_lag(
    config: str,
    config_overrides: list,
    base_model: str,
    cost_budget: float,
    ppo_max_steps: int,
    validated: Input[Dataset],
    reward_model: Input[Model],
    cost_model: Input[Model],
    policy: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Fine-tune the policy with Safe RLHF-V's PPO-Lagrangian under the harm budget."""
    from safe_rlhf_v.components import kfp_io

    return kfp_io.ppo_task(
        "safe-rlhf-v", config, config_overrides, base_model, cost_budget, ppo_max_steps,
        validated, reward_model, cost_model, policy, metrics,
    )  # fmt: skip


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def train_ppo_lag_ablation(
    variant: str,
    config: str,
    config_overrides: list,
    base_model: str,
    cost_budget: float,
    ppo_max_steps: int,
    validated: Input[Dataset],
    reward_model: Input[Model],
    cost_model: Input[Model],
    policy: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Fine-tune an ablation (`reward-only`, `fixed-lambda`) for the comparison table."""
    from safe_rlhf_v.components import kfp_io

    return kfp_io.ppo_task(
        variant, config, config_overrides, base_model, cost_budget, ppo_max_steps,
        validated, reward_model, cost_model, policy, metrics,
    )  # fmt: skip
