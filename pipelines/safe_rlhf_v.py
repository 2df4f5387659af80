"""The Safe RLHF-V Kubeflow pipeline (DAG), built from a `PipelineConfig`.

    validate-data -> train-reward + train-cost + train-guard -> train-ppo-lag (Safe RLHF-V)
                  -> evaluate -> register;   ablations (ParallelFor) train beside it for comparison

The run form asks for the config by reference: `config` names a preset shipped in the image
(`llava-1.5-7b`), an `s3://` URI or a file in a mounted ConfigMap, and `config_overrides` holds
`key=value` overrides (the `--set` syntax). The parameters a person changes most (`data_uri`,
`base_model`, `cost_budget`, `ppo_max_steps`, `ablations`) are separate, with defaults from the
config the pipeline was compiled from. Each stage's component returns its `StageResult` as JSON; the
pipeline returns those as outputs so the local runner can print a summary and the UI shows them.

No task takes the pipeline run's id as an input, so KFP's cache can serve a task whose inputs did
not change: tasks read it from `KFP_RUN_ID`, which the Downward API fills from the pod's
`pipeline/runid` label (KFP's API server puts it on every pod of a run) and the local runner sets.

Cluster-only settings (kfp-kubernetes: Secrets as environment variables, `/dev/shm` as memory, GPU
node selectors and tolerations; retries; images and resources) come from the config too; the local
runner ignores them.

No `from __future__ import annotations` here: KFP reads the pipeline's real parameter annotations.
"""

from collections.abc import Callable
from typing import NamedTuple

from kfp import dsl, kubernetes

from safe_rlhf_v.components.evaluate import evaluate
from safe_rlhf_v.components.kfp_io import RUN_ID_ENV
from safe_rlhf_v.components.register import register
from safe_rlhf_v.components.train_guard import train_guard
from safe_rlhf_v.components.train_ppo_lag import train_ppo_lag, train_ppo_lag_ablation
from safe_rlhf_v.components.train_preference import train_cost, train_reward
from safe_rlhf_v.components.validate_data import validate_data
from safe_rlhf_v.config import CONFIG_MOUNT, PipelineConfig

S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_KEYS = {
    "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
}
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
"""The pod label holding the KFP run id, read through the Downward API into `KFP_RUN_ID`."""


def configure_task(
    task: dsl.PipelineTask, cfg: PipelineConfig, stage: str, image: str, display_name: str | None = None
) -> None:
    """Image, resources, credentials, scheduling and retries of one task, from the config.

    Training stages are never served from KFP's cache unless `kubernetes.cache_training` says so: a
    retrain on the same inputs is the point of a scheduled run, and their outputs depend on the run's
    checkpoints. The other stages are cached: their inputs say everything their outputs depend on.
    Every stage is safe to retry (a preempted spot node, a flaky S3 or MLflow call):
    training resumes from its last checkpoint, validation and evaluation publish their outputs
    atomically, and registration is idempotent per pipeline run.
    """
    kube = cfg.kubernetes
    resources = cfg.resources_for(stage)
    task.set_caching_options(enable_caching=not stage.startswith("train-") or kube.cache_training)
    task.set_container_image(image)
    task.set_cpu_request(resources.cpu).set_memory_request(resources.memory)
    task.set_display_name(display_name or stage)
    kubernetes.use_field_path_as_env(task, env_name=RUN_ID_ENV, field_path=RUN_ID_FIELD)
    if kube.config_map:
        kubernetes.use_config_map_as_volume(task, config_map_name=kube.config_map, mount_path=CONFIG_MOUNT)
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


def build_pipeline(
    cfg: PipelineConfig, config: str, overrides: list[str] | None = None
) -> Callable[..., dsl.PipelineTask]:
    """Return the pipeline function for `cfg` (call it under `kfp.local`, or compile it).

    `config` and `overrides` are the defaults of the `config` and `config_overrides` parameters:
    the reference that the tasks resolve to `cfg` again (a preset, `s3://` URI or file). Images,
    resources and the ablation branch come from `cfg` at compile time.
    """
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
        config: str = config,
        config_overrides: list = list(overrides or []),  # noqa: B006 (KFP reads it as the UI default)
    ) -> Outputs:
        """Safe RLHF-V: align a vision-language model for helpfulness under a harm budget.

        Args:
            data_uri: The BeaverTails-V-format data set: s3://bucket/prefix, hf://owner/name (with
                data.configs and data.revision from the config) or a path the pods can read.
            base_model: The initial policy and the backbone of the reward, cost and guard models: a
                Hugging Face hub id or an s3:// prefix of a model folder.
            cost_budget: The harm budget d of PPO-Lagrangian: the expected cost J_C the policy must stay
                under (cost > 0 means harmful). Also the promotion gate's default threshold.
            ppo_max_steps: Stop PPO after this many actor optimizer steps; 0 trains the config's full
                epochs.
            ablations: PPO ablations trained beside Safe RLHF-V for the comparison table, a JSON list of
                "reward-only" and "fixed-lambda"; [] trains none.
            config: The pipeline config: a preset shipped in the image (demo, llava-1.5-7b, qwen2-vl-7b,
                qwen2.5-vl-7b), an s3:// URI of a YAML file, or the path of a file in the mounted
                ConfigMap (kubernetes.config_map, under /etc/safe-rlhf-v/config).
            config_overrides: Overrides of single config keys, a JSON list of "key.sub=value" strings
                whose values are YAML, e.g. ["train_reward.train.epochs=1"].
        """
        shared = {"config": config, "config_overrides": config_overrides}
        validate = validate_data(data_uri=data_uri, **shared)
        configure_task(validate, cfg, "validate-data", cfg.images.cpu)
        validated = validate.outputs["validated"]
        reward = train_reward(base_model=base_model, validated=validated, **shared)
        configure_task(reward, cfg, "train-reward", cfg.images.gpu)
        cost = train_cost(base_model=base_model, validated=validated, **shared)
        configure_task(cost, cfg, "train-cost", cfg.images.gpu)
        guard = train_guard(base_model=base_model, validated=validated, **shared)
        configure_task(guard, cfg, "train-guard", cfg.images.gpu)
        models = {"reward_model": reward.outputs["model"], "cost_model": cost.outputs["model"]}
        ppo_inputs = {
            **shared,
            "base_model": base_model,
            "cost_budget": cost_budget,
            "ppo_max_steps": ppo_max_steps,
            "validated": validated,
            **models,
        }
        ppo = train_ppo_lag(**ppo_inputs)
        configure_task(ppo, cfg, "train-ppo-lag", cfg.images.gpu)
        collected = {}
        if with_ablations:
            with dsl.ParallelFor(ablations) as variant:
                ablation = train_ppo_lag_ablation(variant=variant, **ppo_inputs)
                configure_task(ablation, cfg, "train-ppo-lag", cfg.images.gpu, "train-ppo-lag-ablation")
            collected["ablations"] = dsl.Collected(ablation.outputs["Output"])
        evaluated = evaluate(
            base_model=base_model,
            cost_budget=cost_budget,
            validated=validated,
            policy=ppo.outputs["policy"],
            guard_model=guard.outputs["guard"],
            **models,
            **shared,
        )
        configure_task(evaluated, cfg, "evaluate", cfg.images.gpu)
        registered = register(
            cost_budget=cost_budget,
            policy=ppo.outputs["policy"],
            guard_model=guard.outputs["guard"],
            evaluation=evaluated.outputs["evaluation"],
            **models,
            **shared,
        )
        configure_task(registered, cfg, "register", cfg.images.cpu)
        return Outputs(
            validate_data=validate.outputs["Output"],
            train_reward=reward.outputs["Output"],
            train_cost=cost.outputs["Output"],
            train_guard=guard.outputs["Output"],
            train_ppo_lag=ppo.outputs["Output"],
            **collected,
            evaluate=evaluated.outputs["Output"],
            register=registered.outputs["Output"],
        )

    return safe_rlhf_v
