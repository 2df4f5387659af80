"""The Safe RLHF-V Kubeflow pipeline (DAG), built from a `PipelineConfig`.

    validate-data -> train-reward + train-cost + train-guard -> train-ppo-lag (Safe RLHF-V)
                  -> evaluate -> register;   ablations (ParallelFor) train beside it for comparison

The config is baked in as the default of the `config_json` parameter, so a compiled YAML carries its
preset, and the parameters a person changes in the Kubeflow UI form (`data_uri`, `base_model`,
`cost_budget`, `ppo_max_steps`, `ablations`) are separate pipeline parameters with defaults from the
same config. Each stage's component returns its `StageResult` as JSON; the pipeline returns those as
outputs so the local runner can print a summary and the UI shows them.

Cluster-only settings (kfp-kubernetes: Secrets as environment variables, `/dev/shm` as memory, GPU
node selectors and tolerations; retries; images and resources) come from the config too; the local
runner ignores them.

No `from __future__ import annotations` here: KFP reads the pipeline's real parameter annotations.
"""

from collections.abc import Callable
from typing import NamedTuple

from kfp import dsl, kubernetes

from safe_rlhf_v.components.evaluate import evaluate
from safe_rlhf_v.components.register import register
from safe_rlhf_v.components.train_guard import train_guard
from safe_rlhf_v.components.train_ppo_lag import train_ppo_lag
from safe_rlhf_v.components.train_preference import train_preference_model
from safe_rlhf_v.components.validate_data import validate_data
from safe_rlhf_v.config import PipelineConfig

S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}


def configure_task(task: dsl.PipelineTask, cfg: PipelineConfig, stage: str, image: str) -> None:
    """Image, resources, credentials, scheduling and retries of one task, from the config.

    Training stages are never served from KFP's cache unless `kubernetes.cache_training` says so: a
    retrain on the same inputs is the point of a scheduled run, and their outputs depend on the run's
    checkpoints. Every stage is safe to retry (a preempted spot node, a flaky S3 or MLflow call):
    training resumes from its last checkpoint, validation and evaluation publish their outputs
    atomically, and registration is idempotent per pipeline run.
    """
    kube = cfg.kubernetes
    resources = cfg.resources_for(stage)
    if stage.startswith("train-") and not kube.cache_training:
        task.set_caching_options(enable_caching=False)
    task.set_container_image(image)
    task.set_cpu_request(resources.cpu).set_memory_request(resources.memory)
    task.set_display_name(stage)
    kubernetes.use_secret_as_env(task, secret_name=kube.s3_secret, secret_key_to_env=S3_KEYS)
    if kube.mlflow_secret:
        kubernetes.use_secret_as_env(task, secret_name=kube.mlflow_secret, secret_key_to_env=MLFLOW_KEYS)
    if stage == "evaluate" and kube.judge_secret and cfg.evaluate.judge:
        key = cfg.evaluate.judge.api_key_env
        kubernetes.use_secret_as_env(task, secret_name=kube.judge_secret, secret_key_to_env={key: key})
    for name, value in sorted(kube.env.items()):
        task.set_env_variable(name, value)
    if resources.gpus:
        task.set_accelerator_type(resources.accelerator).set_accelerator_limit(resources.gpus)
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=kube.shm_size
        )
        for label, value in sorted(kube.gpu_node_selector.items()):
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in kube.gpu_tolerations:
            kubernetes.add_toleration(
                task,
                key=toleration.key,
                operator=toleration.operator,
                value=toleration.value,
                effect=toleration.effect,
            )
    if kube.retries:
        task.set_retry(
            num_retries=kube.retries,
            backoff_duration=kube.retry_backoff,
            backoff_factor=kube.retry_backoff_factor,
            backoff_max_duration=kube.retry_backoff_max,
        )


def build_pipeline(cfg: PipelineConfig) -> Callable[..., dsl.PipelineTask]:
    """Return the pipeline function for `cfg` (call it under `kfp.local`, or compile it)."""
    config_json = cfg.model_dump_json()

    # A config without ablations compiles without the ablation branch (the `ablations` parameter
    # then has no effect): kfp.local cannot collect the outputs of a loop that ran zero times.
    with_ablations = bool(cfg.ablations)
    fields = [(name, str) for name in ("validate_data", "train_reward", "train_cost", "train_guard")]
    fields += [("train_ppo_lag", str), *([("ablations", list)] if with_ablations else [])]
    Outputs = NamedTuple("Outputs", [*fields, ("evaluate", str), ("register", str)])

    @dsl.pipeline(
        name=cfg.name,
        description="Safe RLHF-V: align a vision-language model for helpfulness under a harm budget.",
    )
    def safe_rlhf_v(
        data_uri: str = cfg.data.uri,
        base_model: str = cfg.base_model,
        cost_budget: float = cfg.train_ppo_lag.lagrangian.threshold,
        ppo_max_steps: int = cfg.train_ppo_lag.actor.max_steps or 0,
        ablations: list = list(cfg.ablations),  # noqa: B006 (KFP reads it as the UI default)
        config_json: str = config_json,
    ) -> Outputs:
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        validate = validate_data(config_json=config_json, data_uri=data_uri, pipeline_run_id=run_id)
        configure_task(validate, cfg, "validate-data", cfg.images.cpu)
        validated = validate.outputs["validated"]
        trained = {}
        for stage in ("train-reward", "train-cost"):
            task = train_preference_model(
                stage=stage,
                config_json=config_json,
                base_model=base_model,
                pipeline_run_id=run_id,
                validated=validated,
            )
            configure_task(task, cfg, stage, cfg.images.gpu)
            trained[stage] = task
        guard = train_guard(
            config_json=config_json, base_model=base_model, pipeline_run_id=run_id, validated=validated
        )
        configure_task(guard, cfg, "train-guard", cfg.images.gpu)
        models = {
            "reward_model": trained["train-reward"].outputs["model"],
            "cost_model": trained["train-cost"].outputs["model"],
        }
        ppo_inputs = {
            "config_json": config_json,
            "base_model": base_model,
            "cost_budget": cost_budget,
            "ppo_max_steps": ppo_max_steps,
            "pipeline_run_id": run_id,
            "validated": validated,
            **models,
        }
        ppo = train_ppo_lag(variant="safe-rlhf-v", **ppo_inputs)
        configure_task(ppo, cfg, "train-ppo-lag", cfg.images.gpu)
        collected = {}
        if with_ablations:
            with dsl.ParallelFor(ablations) as variant:
                ablation = train_ppo_lag(variant=variant, **ppo_inputs)
                configure_task(ablation, cfg, "train-ppo-lag", cfg.images.gpu)
            collected["ablations"] = dsl.Collected(ablation.outputs["Output"])
        evaluated = evaluate(
            config_json=config_json,
            base_model=base_model,
            cost_budget=cost_budget,
            pipeline_run_id=run_id,
            validated=validated,
            policy=ppo.outputs["policy"],
            guard_model=guard.outputs["guard"],
            **models,
        )
        configure_task(evaluated, cfg, "evaluate", cfg.images.gpu)
        registered = register(
            config_json=config_json,
            cost_budget=cost_budget,
            pipeline_run_id=run_id,
            policy=ppo.outputs["policy"],
            guard_model=guard.outputs["guard"],
            evaluation=evaluated.outputs["evaluation"],
            **models,
        )
        configure_task(registered, cfg, "register", cfg.images.cpu)
        return Outputs(
            validate_data=validate.outputs["Output"],
            train_reward=trained["train-reward"].outputs["Output"],
            train_cost=trained["train-cost"].outputs["Output"],
            train_guard=guard.outputs["Output"],
            train_ppo_lag=ppo.outputs["Output"],
            **collected,
            evaluate=evaluated.outputs["Output"],
            register=registered.outputs["Output"],
        )

    return safe_rlhf_v
