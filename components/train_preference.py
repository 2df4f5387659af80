"""KFP components `train-reward` and `train-cost`: thin callers of `stages.train_score.run`.

They share one body (`kfp_io.score_task`) and are two components so that the compiled pipeline and
the Kubeflow UI name each after its stage. No `from __future__ import annotations`: KFP reads the
real annotations.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from safe_rlhf_v.config import ImagesConfig


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def train_reward(
    config: str,
    config_overrides: list,
    base_model: str,
    validated: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Train the reward model (RM-V, helpfulness) on the validated data."""
    from safe_rlhf_v.components import kfp_io

    return kfp_io.score_task("train-reward", config, config_overrides, base_model, validated, model, metrics)


@dsl.component(base_image=ImagesConfig().gpu, install_kfp_package=False)
def train_cost(
    config: str,
    config_overrides: list,
    base_model: str,
    validated: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
) -> str:
    """Train the cost model (CM-V, harm: cost > 0 means harmful) on the validated data."""
    from safe_rlhf_v.components import kfp_io

    return kfp_io.score_task("train-cost", config, config_overrides, base_model, validated, model, metrics)
