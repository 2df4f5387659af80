"""The Safe RLHF-V Kubeflow pipeline (DAG), built from a `PipelineConfig`.

The config is baked in as the default of the `config_json` parameter, so a compiled YAML carries its
preset, and the parameters a person changes in the Kubeflow UI form (`data_uri`, ...) are separate
pipeline parameters with defaults from the same config. Each stage's component returns its
`StageResult` as JSON; the pipeline returns those as outputs so the local runner can print a summary
and the UI shows them.

No `from __future__ import annotations` here: KFP reads the pipeline's real parameter annotations.
"""

from collections.abc import Callable
from typing import NamedTuple

from kfp import dsl

from safe_rlhf_v.components.train_guard import train_guard
from safe_rlhf_v.components.train_ppo_lag import train_ppo_lag
from safe_rlhf_v.components.train_preference import train_preference_model
from safe_rlhf_v.components.validate_data import validate_data
from safe_rlhf_v.config import PipelineConfig


def _request_resources(task: dsl.PipelineTask, cfg: PipelineConfig, stage: str, image: str) -> None:
    """Apply the stage's image and resource requests (Kubernetes reads them; kfp.local ignores them).

    Training stages are never served from KFP's cache: a retrain on the same inputs is the point of
    a scheduled run, and their outputs depend on the run's checkpoints.
    """
    resources = cfg.resources_for(stage)
    if stage.startswith("train-"):
        task.set_caching_options(enable_caching=False)
    task.set_container_image(image)
    task.set_cpu_request(resources.cpu).set_memory_request(resources.memory)
    if resources.gpus:
        task.set_accelerator_type(resources.accelerator).set_accelerator_limit(resources.gpus)
    task.set_display_name(stage)


def build_pipeline(cfg: PipelineConfig) -> Callable[..., dsl.PipelineTask]:
    """Return the pipeline function for `cfg` (call it under `kfp.local`, or compile it)."""
    config_json = cfg.model_dump_json()

    class Outputs(NamedTuple):
        validate_data: str
        train_reward: str
        train_cost: str
        train_guard: str
        train_ppo_lag: list

    @dsl.pipeline(
        name=cfg.name,
        description="Safe RLHF-V: align a vision-language model for helpfulness under a harm budget.",
    )
    def safe_rlhf_v(
        data_uri: str = cfg.data.uri,
        base_model: str = cfg.base_model,
        ppo_variants: list = list(cfg.ppo_variants),  # noqa: B006 (KFP reads it as the UI default)
        config_json: str = config_json,
    ) -> Outputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        validate = validate_data(config_json=config_json, data_uri=data_uri, pipeline_run_id=run_id)
        _request_resources(validate, cfg, "validate-data", cfg.images.cpu)
        trained = {}
        for stage in ("train-reward", "train-cost"):
            task = train_preference_model(
                stage=stage,
                config_json=config_json,
                base_model=base_model,
                pipeline_run_id=run_id,
                validated=validate.outputs["validated"],
            )
            _request_resources(task, cfg, stage, cfg.images.gpu)
            trained[stage] = task
        guard = train_guard(
            config_json=config_json,
            base_model=base_model,
            pipeline_run_id=run_id,
            validated=validate.outputs["validated"],
        )
        _request_resources(guard, cfg, "train-guard", cfg.images.gpu)
        with dsl.ParallelFor(ppo_variants) as variant:
            ppo = train_ppo_lag(
                variant=variant,
                config_json=config_json,
                base_model=base_model,
                pipeline_run_id=run_id,
                validated=validate.outputs["validated"],
                reward_model=trained["train-reward"].outputs["model"],
                cost_model=trained["train-cost"].outputs["model"],
            )
            _request_resources(ppo, cfg, "train-ppo-lag", cfg.images.gpu)
            ppo.after(guard)  # the guard gates the evaluation of the trained policy
        return Outputs(
            validate_data=validate.outputs["Output"],
            train_reward=trained["train-reward"].outputs["Output"],
            train_cost=trained["train-cost"].outputs["Output"],
            train_guard=guard.outputs["Output"],
            train_ppo_lag=dsl.Collected(ppo.outputs["Output"]),
        )

    return safe_rlhf_v
