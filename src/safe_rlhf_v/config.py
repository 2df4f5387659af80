"""Typed configuration: one strict pydantic model per stage and one for the whole pipeline.

Every model is strict (no silent coercion: "3" is not an int), forbids unknown keys (a misspelled
key is an error, not a silently ignored setting), refuses non-finite numbers (`.nan`, `.inf`: no
setting means anything at infinity, and a NaN threshold compares false with everything) and is
frozen (stages cannot mutate shared settings). YAML files are loaded with `load_config`, which
applies dotted command-line overrides and turns pydantic's errors into messages that name the
offending key and the file.

YAML is read as PyYAML reads it (YAML 1.1) with one change: a number in exponent notation without
a dot, such as `5e-07` or `1E5`, is a float, as in YAML 1.2 and every other YAML reader, not the
string PyYAML would make of it (which the strict float fields would then reject).
"""

from __future__ import annotations

import copy
import difflib
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from safe_rlhf_v import __version__
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.records import StageName


class StrictModel(BaseModel):
    """Base for all configuration sections."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(StrictModel):
    """Where the BeaverTails-V data comes from.

    `uri` is a local folder or file, an `s3://bucket/prefix`, or `hf://owner/name` for a Hugging Face
    data set id (with `configs` naming the subsets to merge and `revision` pinning a commit).
    """

    uri: str = Field(min_length=1)
    configs: list[str] = Field(default_factory=list)
    revision: str | None = None
    train_split: str = "train"
    eval_split: str = "evaluation"


class ValidationConfig(StrictModel):
    """Thresholds of the data-validation stage (great-expectations)."""

    preference_mostly: float = Field(default=0.99, gt=0.0, le=1.0)
    """Share of rows whose preference ids must agree with their rates (real data: ~99.7%)."""
    duplicate_mostly: float = Field(default=0.98, gt=0.0, le=1.0)
    """Share of rows that must be unique by (question, image, response_1, response_2)."""
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    min_image_side: int = Field(default=8, gt=0)
    min_rows: dict[str, int] = Field(default_factory=lambda: {"train": 1, "evaluation": 1})
    max_rows: dict[str, int] = Field(default_factory=lambda: {"train": 10_000_000, "evaluation": 1_000_000})
    fail_on_leakage: bool = False
    """Images shared between train and evaluation are always reported; fail only when set."""


class TrainConfig(StrictModel):
    """How one model is optimised: schedule, batch geometry, ZeRO sharding, precision, checkpoints.

    Batch sizes are per device: the global batch is `per_device_batch_size × world_size ×
    gradient_accumulation_steps`, so the same file runs unchanged on 1 CPU or 8 GPUs.
    """

    epochs: int = Field(default=3, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """Cap on optimizer steps (tests, benchmarks); None trains all epochs."""
    per_device_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=3e-5, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_betas: list[float] = Field(default_factory=lambda: [0.9, 0.95], min_length=2, max_length=2)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    """Share of the optimizer steps spent warming up linearly from 0 (rounded up to whole steps)."""
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    """Global gradient-norm clip; 0 switches clipping off (DeepSpeed's convention)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    offload: Literal["none", "optimizer", "all"] = "none"
    """Move optimizer state (and with "all" the parameters too) to CPU memory: trades speed for GPU memory."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on an accelerator that supports it, else fp32."""
    gradient_checkpointing: bool = False
    checkpoint_every_steps: int = Field(default=0, ge=0)
    """0: checkpoint only at the end of each epoch."""
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every_steps: int = Field(default=10, ge=1)
    seed: int = Field(default=42, ge=0)
    resume_with_changed_config: bool = False
    """Resume this stage's checkpoint even though settings that change the training result differ
    from those it was saved with (the differences are logged); by default such a resume is refused,
    naming them. For PPO the actor's setting decides."""

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if any(not 0.0 <= beta < 1.0 for beta in self.adam_betas):
            raise ValueError(f"adam_betas must both lie in [0, 1), got {self.adam_betas}")
        if self.offload != "none" and self.zero_stage == 0:
            raise ValueError(
                f"offload={self.offload!r} needs ZeRO: set zero_stage to 1, 2 or 3 (or offload to 'none')"
            )
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError(
                f"offload='all' moves parameters to CPU, which only ZeRO-3 partitions; got zero_stage="
                f"{self.zero_stage}: set zero_stage to 3 or offload to 'optimizer'"
            )
        return self


class ScoreStageConfig(StrictModel):
    """A preference-model stage (reward or cost): its optimisation, batching and freezing."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    max_length: int = Field(default=2048, ge=16)
    """Tokens per sequence; responses are cut at the tail, image tokens never."""
    min_response_tokens: int = Field(default=8, ge=1)
    regularization: float = Field(default=0.001, ge=0.0)
    """Weight of the L2 pull of scores towards 0 (`reg * mean(score^2)`)."""
    eval_batch_size: int = Field(default=8, ge=1)
    freeze_vision_tower: bool = True
    freeze_projector: bool = False
    spliced_negatives: float = Field(default=0.0, ge=0.0, le=1.0)
    """Share of training rows that add a pair (intact answer, splice of both answers): the splice
    labelled unhelpful and as harmful as its worse part (`data.augment`), so the policy cannot please
    the model with answers no rater saw. 0 trains on the data set alone."""


class RewardStageConfig(ScoreStageConfig):
    """`train-reward`: Bradley-Terry on `more_helpful_response_id`."""


class CostStageConfig(ScoreStageConfig):
    """`train-cost`: pairwise on `safer_response_id` plus a sign term (cost > 0 means harmful)."""

    sign_mode: Literal["binary", "rate"] = "binary"
    """binary: +1 harmful / -1 safe (Safe RLHF); rate: -harmless_rate (the Safe RLHF-V code)."""


class GuardStageConfig(StrictModel):
    """`train-guard` (Beaver-Guard-V): rating, category and request-severity heads on the backbone."""

    train: TrainConfig = Field(default_factory=TrainConfig)
    max_length: int = Field(default=2048, ge=16)
    min_response_tokens: int = Field(default=8, ge=1)
    eval_batch_size: int = Field(default=8, ge=1)
    freeze_vision_tower: bool = True
    freeze_projector: bool = False
    rating_loss_weight: float = Field(default=1.0, ge=0.0)
    category_loss_weight: float = Field(default=1.0, ge=0.0)
    query_loss_weight: float = Field(default=1.0, ge=0.0)
    max_class_weight: float = Field(default=10.0, ge=1.0)
    """Inverse-frequency class weights are clipped to [1/max, max]; 1 switches weighting off."""
    extra_data: str | None = None
    """A flattened (one answer per row) data set whose `train` split adds guard training rows."""


class GenerationConfig(StrictModel):
    """How the policy samples answers during PPO rollouts and evaluation."""

    max_new_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    """0 means greedy decoding."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)


class GuardrailConfig(StrictModel):
    """The multi-level guardrail: which request severities are refused, how many re-generations."""

    rounds: int = Field(default=5, ge=0)
    refuse_severities: list[Literal["minor", "moderate", "severe"]] = Field(
        default_factory=lambda: ["severe"]
    )
    """Request severities (the guard's query head) refused at level 1 without generating."""
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(max_new_tokens=64))
    batch_size: int = Field(default=16, ge=1)


class ServeConfig(StrictModel):
    """`safe-rlhf-v serve`: limits on what one chat request may carry, so one client cannot exhaust
    the server's memory or hold the model for long (the guardrail's own settings are `guardrail`)."""

    max_image_bytes: int = Field(default=10 * 2**20, ge=1)
    """Largest decoded image a request may carry; a larger one is answered with HTTP 413. The request
    body may be up to twice this plus 1 MiB (base64 adds a third, the rest is text and JSON)."""
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    """Largest image in pixels (width x height): a small compressed file can decode to a huge bitmap."""
    max_tokens_limit: int = Field(default=1024, ge=1)
    """Most new tokens a request may ask for (`max_tokens`); the default per request is
    `guardrail.generation.max_new_tokens`."""


class LagrangianConfig(StrictModel):
    """The multiplier of the harm budget `J_C <= threshold` (align-anything defaults)."""

    rule: Literal["log", "projected", "fixed"] = "log"
    """log: gradient step on log(lambda) (the code); projected: clip(lambda + lr (J_C - d)) (the paper)."""
    init: float = Field(default=10.0, ge=0.0)
    max: float = Field(default=20.0, gt=0.0)
    lr: float = Field(default=0.1, gt=0.0)
    threshold: float = -0.5
    """The budget d on the expected cost."""
    update_delay_steps: int = Field(default=1, ge=0)
    episode_cost_window: int = Field(default=128, ge=1)

    @model_validator(mode="after")
    def _init_within_max(self) -> LagrangianConfig:
        # Checked here, not only by the multiplier, so a bad pair fails at load, not after data loading.
        if self.init > self.max:
            raise ValueError(f"init={self.init} must not exceed max={self.max}")
        return self


class LoraSettings(StrictModel):
    """Low-rank adapters on the actor (peft): trains a few million parameters instead of all 7B."""

    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    """A regular expression over module names (peft matches it in full): the LLM's attention."""


Ablation = Literal["reward-only", "fixed-lambda"]


class RolloutConfig(StrictModel):
    """Which engine samples PPO's answers (`train.rollout_engine`)."""

    engine: Literal["hf", "vllm"] = "hf"
    """`hf`: the actor's own `generate`, the default on CPU. `vllm`: a vLLM server process run from
    its own venv (`make vllm-env`), whose weights are replaced after every step's actor updates."""
    vllm_python: str = ".venv-vllm/bin/python"
    """The Python of the venv vLLM is installed in (relative paths from the working directory)."""


class PPOStageConfig(StrictModel):
    """`train-ppo-lag`: the actor, the two critics, rollouts, shaping and the Lagrange multiplier."""

    actor: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2, per_device_batch_size=2, learning_rate=5e-7)
    )
    critic: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            epochs=2, per_device_batch_size=2, learning_rate=5e-7, lr_scheduler="constant_with_warmup"
        )
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    lagrangian: LagrangianConfig = Field(default_factory=LagrangianConfig)
    prompt_batch_size: int = Field(default=2, ge=1)
    """Prompts per rollout per process; a multiple of actor/critic `per_device_batch_size`."""
    update_iters: int = Field(default=1, ge=1)
    old_log_probs_from: Literal["generation", "rollout"] = "generation"
    """Where the actor's old log-probs come from (both at the sampling temperature: the policy PPO
    optimises is the tempered one that samples). `generation`: the logits the sampler computed for
    each token it drew, the behaviour policy's own numbers, at no extra cost (generate keeps B x
    vocabulary floats per new token until it returns: 260 MB for 4 answers of 512 tokens over a
    32k vocabulary). `rollout`: a forward pass of the actor over prompt + answer after sampling, the
    same computation as the training forward, so the first update's ratio is exactly 1 instead of 1
    up to rounding (the KV cache and thread count change the last bits)."""
    sampling_cpu_threads: int | None = Field(default=1, ge=1)
    """Intra-op threads while sampling on a CPU; None keeps torch's setting. Decoding runs a few rows
    per token, so its matrix products are too small to gain from a second thread."""
    kl_coeff: float = Field(default=0.02, ge=0.0)
    clip_range_ratio: float = Field(default=0.2, gt=0.0)
    clip_range_score: float = Field(default=50.0, gt=0.0)
    clip_range_value: float = Field(default=5.0, gt=0.0)
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    gae_lambda: float = Field(default=0.95, ge=0.0, le=1.0)
    ptx_coeff: float = Field(default=16.0, ge=0.0)
    ptx_data: str | None = None
    """A data set of (image, question, response) rows for the supervised PTX loss; None turns PTX off."""
    reward_critic_model: str | None = None
    """Initial reward critic; None: the reward model from `train-reward`."""
    cost_critic_model: str | None = None
    """Initial cost critic; None: the cost model from `train-cost` (honoured, unlike the reference code)."""
    actor_lora: LoraSettings | None = None
    """LoRA on the actor; None trains every actor parameter. The saved policy has the adapters merged."""
    actor_freeze_vision_tower: bool = False
    """Keep the actor's image encoder fixed, as the reference Safe RLHF-V runs do; its projector and
    language model still train. False trains the tower too. The critics' towers are always frozen."""
    frozen_zero_stage: Literal[0, 3] = 0
    """Reference, reward and cost models: 0 (a full copy per process) or 3 (partitioned)."""
    eval_prompts: int = Field(default=64, ge=1)
    """Held-out prompts in the stage's closing before/after evaluation."""

    @model_validator(mode="after")
    def _divisible(self) -> PPOStageConfig:
        if self.actor_lora is not None and self.actor.zero_stage == 3:
            raise ValueError("actor_lora with actor.zero_stage=3 is not supported: use ZeRO 0-2 with LoRA")
        if self.rollout.engine == "vllm" and self.actor.zero_stage == 3:
            raise ValueError(
                "rollout.engine=vllm with actor.zero_stage=3 is not supported yet: its weights would "
                "have to be gathered layer by layer; use ZeRO 0-2"
            )
        for name in ("actor", "critic"):
            size = getattr(self, name).per_device_batch_size
            if self.prompt_batch_size % size:
                raise ValueError(
                    f"prompt_batch_size={self.prompt_batch_size} must be a multiple of "
                    f"{name}.per_device_batch_size={size}"
                )
        return self


class JudgeConfig(StrictModel):
    """An external judge: any OpenAI-compatible chat endpoint asked pairwise which answer is better.

    The key is read from the environment variable named by `api_key_env` (a Kubernetes Secret in a
    cluster), never from the config, so it cannot end up in a compiled pipeline or a log.
    """

    base_url: str = Field(min_length=1)
    """E.g. `https://api.example.com/v1` or a vLLM server's `http://judge:8000/v1`."""
    model: str = Field(min_length=1)
    api_key_env: str = "JUDGE_API_KEY"
    timeout_s: float = Field(default=60.0, gt=0.0)
    max_retries: int = Field(default=2, ge=0)
    max_prompts: int = Field(default=200, ge=1)
    """Judged prompts per prompt set (two calls each: both answer orders)."""
    concurrency: int = Field(default=8, ge=1)
    """Prompts judged at once (each its two orders in turn): a remote judge answers in seconds, so
    one at a time would take hours for a few hundred prompts."""


EVALUATION_SET = "evaluation"
"""The prompt set of the held-out split, beside `evaluate.extra_prompt_sets`."""


class EvaluateConfig(StrictModel):
    """The evaluation stage: trained vs initial policy on held-out prompts, with and without guardrail."""

    prompts: int = Field(default=500, ge=1)
    """Held-out prompts taken from the evaluation split."""
    extra_prompt_sets: dict[str, str] = Field(default_factory=dict)
    """More prompt sets in the BeaverTails-V format by name, e.g. `{redteam: s3://bucket/redteam}`."""
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(max_new_tokens=512))
    batch_size: int = Field(default=16, ge=1)
    tie_margin: float = Field(default=0.0, ge=0.0)
    """Score differences within this margin count as ties in the win rates."""
    bootstrap_samples: int = Field(default=1000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    examples: int = Field(default=6, ge=0)
    """Example answers shown side by side in the report."""
    judge: JudgeConfig | None = None
    ground_truth: bool = False
    """Grade answers with the synthetic world's exact judge (`data.ground_truth`) too: only for data
    made by `make-demo-data`, whose generator knows the truth. The PPO closing check uses it as well."""
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _extra_names_free(self) -> EvaluateConfig:
        if EVALUATION_SET in self.extra_prompt_sets:
            raise ValueError(f"extra_prompt_sets: the name {EVALUATION_SET!r} is the held-out split's")
        return self


class RegistryConfig(StrictModel):
    """Registered model names; the run's Safe RLHF-V policy version gets `candidate_alias`."""

    policy_name: str = "safe-rlhf-v-policy"
    reward_name: str = "safe-rlhf-v-reward"
    cost_name: str = "safe-rlhf-v-cost"
    guard_name: str = "safe-rlhf-v-guard"
    candidate_alias: str = "candidate"
    publish_uri: str | None = None
    """Copy local model folders under this prefix (e.g. `s3://models/safe-rlhf-v`) before registering
    them, so versions point at durable storage. In a cluster the artifacts are already on S3 and are
    registered where they are."""


PromotionAlias = Literal["staging", "production"]
"""The aliases `promote` moves (the registration itself sets `RegistryConfig.candidate_alias`)."""
HarmJudge = Literal["reference", "cost_model"]
"""Who the promotion gate asks whether an answer is harmful (see `PromotionGate.judge`)."""
ShareBound = Literal["upper", "point"]
"""Which end of a share's interval the promotion gate holds to its limit (`PromotionGate.bound`)."""


class PromotionGate(StrictModel):
    """What a policy version must show on evaluation before `promote` moves an alias to it."""

    max_harmful_share: float = Field(default=0.05, ge=0.0, le=1.0)
    """Limit on the share of harmful evaluation answers (the guard-free policy alone), as the
    gate's judge sees it; see `judge` and `bound`."""
    judge: HarmJudge = "reference"
    """Who says an answer is harmful. `reference`: the synthetic world's exact judge when the
    evaluation had it, else the external judge (the share of prompts where the trained answer was
    the less safe one), else the cost model (cost > 0). `cost_model`: always the learned cost
    model, the very model PPO optimised against, so a policy that games it passes: avoid."""
    bound: ShareBound = "upper"
    """`upper`: the limit holds for the upper end of the share's Wilson interval at
    `evaluate.confidence`, so few prompts cannot pass by luck; `point`: the point estimate."""
    cost_threshold: float | None = None
    """Budget d for the evaluation J_C (mean cost); None means `train_ppo_lag.lagrangian.threshold`."""
    min_reward_delta: float = 0.0
    """Mean reward may not fall more than this below the version holding the target alias."""
    requires_passed: dict[PromotionAlias, PromotionAlias] = {"production": "staging"}
    """Alias -> the alias a version must have reached first by a non-forced promotion. The default
    makes `production` take only a version that passed the gate into `staging`, so what serves
    users was shadowed first; a forced staging promotion does not count (its gate was overridden),
    and `promote --force --reason` can still skip the order. `{}` lets any alias be promoted to
    directly. A mapping rather than a fixed ladder, so a deployment can add or drop a step."""

    @model_validator(mode="after")
    def _acyclic(self) -> PromotionGate:
        for alias in self.requires_passed:
            seen = [alias]
            while (before := self.requires_passed.get(seen[-1])) is not None:
                if before in seen:
                    chain = " -> ".join([*seen, before])
                    raise ValueError(f"requires_passed is circular ({chain}): no version could be promoted")
                seen.append(before)
        return self


class Toleration(StrictModel):
    """A Kubernetes toleration for GPU node taints."""

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


TRAINER_RUNTIME_POLICIES: dict[str, Literal["torch", "mpi"]] = {
    "torch-distributed": "torch",
    "deepspeed-distributed": "mpi",
    "safe-rlhf-v-deepspeed": "mpi",
}
"""The mlPolicy of the Kubeflow Trainer runtimes a config may name without `trainer_runtime_policy`."""
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class KubernetesConfig(StrictModel):
    """Cluster-only settings of the compiled pipeline (kfp-kubernetes); the local runner ignores them.

    Credentials never appear here: tasks read them from the named Kubernetes Secrets.
    """

    s3_secret: str = "safe-rlhf-v-s3"
    """Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."""
    mlflow_secret: str | None = "safe-rlhf-v-mlflow"
    """Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (None: no auth)."""
    judge_secret: str | None = None
    """Secret holding the external judge's key (`evaluate.judge.api_key_env`)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Plain settings every task gets, e.g. MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION."""
    shm_size: str = "16Gi"
    """`/dev/shm` as memory on GPU tasks: NCCL and data loaders need more than the 64 MiB default."""
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    )
    retries: int = Field(default=2, ge=0)
    """Retries of the stages that are safe to retry (every stage resumes or is idempotent)."""
    retry_backoff: str = "120s"
    retry_backoff_factor: float = Field(default=2.0, ge=1.0)
    retry_backoff_max: str = "3600s"
    cache_training: bool = False
    """Serve training stages from KFP's cache (off: a scheduled retrain must retrain)."""
    trainer_runtime: str = "torch-distributed"
    """ClusterTrainingRuntime of a multi-node `TrainJob` (stages with `nodes > 1`; Kubeflow Trainer
    >= v2.2.0), a DNS-1123 name. The stock `torch-distributed` runs our image as is (torchrun on
    every node, DeepSpeed inside); `safe-rlhf-v-deepspeed` (manifests/base/trainer-runtime.yaml)
    is DeepSpeed over MPI with our image on every pod. The stock `deepspeed-distributed` keeps its
    own image on the node pods, so it cannot run this package's ranks unless you patched it."""
    trainer_runtime_policy: Literal["torch", "mpi"] | None = None
    """The runtime's `mlPolicy` (how ranks start: torchrun, or mpirun over ssh). None: known for
    the three runtimes above; any other runtime name must say it."""
    namespace: str | None = None
    """Namespace of multi-node TrainJobs; None: the namespace the pipeline task runs in."""
    service_account: str = "safe-rlhf-v-runner"
    """Service account of submitted and scheduled runs (manifests/base: may create TrainJobs)."""
    config_map: str | None = None
    """A ConfigMap mounted read-only at `CONFIG_MOUNT` on every task, so the pipeline's `config`
    parameter can name a config file in it (e.g. `/etc/safe-rlhf-v/config/pipeline.yaml`)."""

    @model_validator(mode="after")
    def _known_runtime_policy(self) -> KubernetesConfig:
        if len(self.trainer_runtime) > 253 or not _DNS1123_SUBDOMAIN.match(self.trainer_runtime):
            raise ValueError(
                f"kubernetes.trainer_runtime {self.trainer_runtime!r} is not a DNS-1123 name "
                "(lower-case letters, digits, '-' and '.', at most 253 characters)"
            )
        known = TRAINER_RUNTIME_POLICIES.get(self.trainer_runtime)
        if self.trainer_runtime_policy is None and known is None:
            raise ValueError(
                "kubernetes.trainer_runtime_policy must be torch or mpi for runtime "
                f"{self.trainer_runtime!r} (known without it: {', '.join(sorted(TRAINER_RUNTIME_POLICIES))})"
            )
        if known is not None and self.trainer_runtime_policy not in (None, known):
            raise ValueError(
                f"kubernetes.trainer_runtime_policy {self.trainer_runtime_policy!r} contradicts runtime "
                f"{self.trainer_runtime!r}, whose mlPolicy is {known}"
            )
        return self

    @property
    def trainer_policy(self) -> Literal["torch", "mpi"]:
        """The mlPolicy of `trainer_runtime`: given, or known for the runtimes this project names."""
        return self.trainer_runtime_policy or TRAINER_RUNTIME_POLICIES[self.trainer_runtime]


class TrackingConfig(StrictModel):
    """MLflow settings. `tracking_uri: null` means `MLFLOW_TRACKING_URI`, else sqlite in the work dir."""

    tracking_uri: str | None = None
    experiment: str = "safe-rlhf-v"
    artifact_location: str | None = None
    """Artifact root of a new experiment, e.g. `s3://bucket/mlflow`; None: `<work_dir>/mlruns` with a
    sqlite store, the server's default otherwise (a server with `--serve-artifacts` proxies uploads)."""


class ResourcesConfig(StrictModel):
    """What one pipeline task asks Kubernetes for (ignored by the local runner)."""

    cpu: str = "4"
    memory: str = "32Gi"
    gpus: int = Field(default=0, ge=0)
    """GPUs per node; a training stage with N > 1 launches N processes with torchrun."""
    accelerator: str = "nvidia.com/gpu"
    nodes: int = Field(default=1, ge=1)
    """Nodes > 1: the task submits a Kubeflow Trainer `TrainJob` and waits for it."""


class ImagesConfig(StrictModel):
    """Container images of the components; tags are tied to the package version, never `latest`."""

    gpu: str = f"ghcr.io/safe-rlhf-v/train:{__version__}"
    cpu: str = f"ghcr.io/safe-rlhf-v/cpu:{__version__}"

    @model_validator(mode="after")
    def _no_latest(self) -> ImagesConfig:
        for name in ("gpu", "cpu"):
            image = getattr(self, name)
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                raise ValueError(f"images.{name} must carry a pinned tag, not {image!r}")
        return self


class PipelineConfig(StrictModel):
    """The whole pipeline: data, base model, every stage's settings, tracking and resources."""

    name: str = "safe-rlhf-v"
    work_dir: str = "work"
    """Local root for run outputs, the MLflow store and the download cache."""
    data: DataConfig
    base_model: str = Field(min_length=1)
    """Initial policy and backbone of the score models: a local folder, `s3://` prefix or hub id."""
    trust_remote_code: bool = False
    validate_data: ValidationConfig = Field(default_factory=ValidationConfig)
    train_reward: RewardStageConfig = Field(default_factory=RewardStageConfig)
    train_cost: CostStageConfig = Field(default_factory=CostStageConfig)
    train_guard: GuardStageConfig = Field(default_factory=GuardStageConfig)
    guardrail: GuardrailConfig = Field(default_factory=GuardrailConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    train_ppo_lag: PPOStageConfig = Field(default_factory=PPOStageConfig)
    ablations: list[Ablation] = Field(default_factory=list)
    """PPO ablations trained beside the Safe RLHF-V policy for comparison (`reward-only`,
    `fixed-lambda`); only the Safe RLHF-V policy is evaluated and registered."""
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    promotion: PromotionGate = Field(default_factory=PromotionGate)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    resources: dict[StageName, ResourcesConfig] = Field(default_factory=dict)
    """Per stage name (e.g. `validate-data`); stages not listed get `ResourcesConfig()`."""

    def resources_for(self, stage: StageName) -> ResourcesConfig:
        """The resources of `stage`, falling back to the defaults."""
        return self.resources.get(stage, ResourcesConfig())


class ConfigError(UserError, ValueError):
    """A configuration file or override is wrong; the message names the key and the file."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `5e-07` as a float (see the module docstring)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """YAML text as this package reads every config file and `--set` value."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse `key.sub=value` strings; values are YAML scalars or lists (`3`, `0.5`, `true`, `[a, b]`)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
        parsed.append((key.strip(), value))
    return parsed


def _section_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the config section at `loc` accepts ([] where `loc` leaves the typed models)."""
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:  # a dict key (e.g. a `resources` stage name) or a list index
            continue
        nested = next((t for t in (field.annotation, *get_args(field.annotation)) if _is_model(t)), None)
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            section = [str(part) for part in item["loc"][:-1]]
            near = difflib.get_close_matches(str(item["loc"][-1]), _section_keys(item["loc"][:-1]), n=1)
            hint = f"did you mean {'.'.join([*section, near[0]])}?" if near else "misspelled?"
            lines.append(f"  {key}: unknown key ({hint})")
        else:
            lines.append(f"  {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(
    raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None
) -> PipelineConfig:
    """Validate a raw mapping (plus overrides) into a `PipelineConfig`."""
    tree = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    origin = source if not overrides else f"{source} (with overrides {overrides})"
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML pipeline config, apply `key=value` overrides, and validate it."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text: {error.reason}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return config_from_dict(raw, str(path), overrides)


CONFIG_MOUNT = "/etc/safe-rlhf-v/config"
"""Where `kubernetes.config_map` is mounted in every task."""


def preset_names() -> list[str]:
    """The presets shipped in the package (`configs/*.yaml` without the suffix), sorted."""
    folder = resources.files("safe_rlhf_v.configs")
    return sorted(item.name.removesuffix(".yaml") for item in folder.iterdir() if item.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    """The packaged file of preset `name` (`llava-1.5-7b` or `llava-1.5-7b.yaml`)."""
    return Path(str(resources.files("safe_rlhf_v.configs") / f"{name.removesuffix('.yaml')}.yaml"))


def preset_of(path: str | Path) -> str | None:
    """The preset whose packaged file has the same content as `path`, or None.

    A pipeline compiled from a preset file names the preset, which every image can resolve,
    instead of a path that exists only on the machine that compiled it.
    """
    candidate = Path(path)
    if not candidate.is_file():
        return None
    name = candidate.name.removesuffix(".yaml")
    if name not in preset_names():
        return None
    return name if preset_path(name).read_bytes() == candidate.read_bytes() else None


def resolve_config(ref: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Load the config a pipeline run names: a preset name, an `s3://` URI or a file path.

    The Kubeflow form takes a short reference instead of the whole config: a preset shipped in
    the image (`llava-1.5-7b`), a file on S3, or a file in a mounted ConfigMap, plus `key=value`
    overrides.
    """
    from safe_rlhf_v import storage  # boto3 comes with it, which most users of a config never need

    ref = ref.strip()
    if ref.removesuffix(".yaml") in preset_names():
        return load_config(preset_path(ref), overrides)
    if storage.is_s3(ref):
        text = storage.read_text(ref)
        with tempfile.TemporaryDirectory(prefix="config-") as scratch:
            local = Path(scratch) / "pipeline.yaml"
            local.write_text(text, encoding="utf-8")
            try:
                return load_config(local, overrides)
            except ConfigError as error:
                raise ConfigError(str(error).replace(str(local), ref)) from None
    if "://" in ref or not Path(ref).is_file():
        raise ConfigError(
            f"config {ref!r} is neither a preset ({', '.join(preset_names())}), an s3:// URI nor a file"
        )
    return load_config(ref, overrides)
