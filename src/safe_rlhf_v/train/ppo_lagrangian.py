"""Safe RLHF-V: PPO with a Lagrangian harm budget, on the DeepSpeed engine, CPU and GPU alike.

Six roles: the actor (trained), the reference (frozen copy of the initial actor), the reward and cost
models (frozen, from `train-reward` / `train-cost`), and the reward and cost critics (trained,
initialised from the reward and cost models unless configured otherwise). One step:

1. rollout: sample answers to a batch of prompts through the rollout engine (`rollout_engine`,
   told after every step's actor updates so it samples from the new weights); score them (reward,
   cost at the last real token), log-probabilities of actor and reference, values of both critics;
2. per-token signals `r_t = -beta kl_t (+ reward at the end)`, `c_t = +beta kl_t (+ cost at the end)`,
   GAE for each with the response mask;
3. lambda update from J_C (the mean of the last `window` episode costs, averaged over ranks);
4. actor update on `(A_r - lambda A_c) / (1 + lambda)` with the clipped surrogate (plus the PTX loss
   when configured), then the two clipped critic updates.

Work saved without changing the maths. The actor's old log-probs come from the logits `generate`
computed while sampling (`old_log_probs_from: generation`, the default), not from a forward pass of
their own. With one update of one micro-batch per rollout (`update_iters: 1`, `prompt_batch_size`
equal to the actor's `per_device_batch_size`, the reference settings) and no dropout, the critics'
old values equal what their first training forward computes: nothing has updated the weights since
the rollout. The trainer then reads them from that forward instead of two scoring passes: each critic
runs forward, GAE, backward and step in turn (its loss needs only its own values and the shaped
signal), then the actor updates with both critics' advantages, so one autograd graph is alive at a
time. The losses, GAE and lambda update are the same on every path.

Variants (ablations through config): `reward-only` (lambda fixed at 0, no cost critic) and
`fixed-lambda` (lambda stays at its initial value).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText, PreTrainedModel, ProcessorMixin

from safe_rlhf_v.config import ConfigError, PPOStageConfig
from safe_rlhf_v.data.collate import SupervisedCollator
from safe_rlhf_v.data.ground_truth import TruthVerdict, judge
from safe_rlhf_v.evaluate.metrics import win_rate
from safe_rlhf_v.models.family import family_of
from safe_rlhf_v.models.loading import ModelFolderError, load_model, load_processor
from safe_rlhf_v.models.score import ScoreModel
from safe_rlhf_v.records import Variant
from safe_rlhf_v.train.checkpoint import Checkpointer, engine_fingerprint
from safe_rlhf_v.train.distributed import (
    Engine,
    all_reduce_mean,
    build_for_training,
    frozen_engine,
    get_logger,
    init_distributed,
    seed_everything,
)
from safe_rlhf_v.train.lagrangian import LagrangeMultiplier
from safe_rlhf_v.train.loop import (
    BatchStream,
    MetricsLog,
    MetricsSink,
    Position,
    check_finite,
    every,
    format_metrics,
    log_due,
    reached,
)
from safe_rlhf_v.train.losses import (
    combined_advantage,
    critic_loss,
    gae,
    masked_mean,
    ppo_actor_loss,
    shaped_rewards,
)
from safe_rlhf_v.train.rollout import (
    Rollout,
    policy_temperature,
    response_logits,
    response_values,
    sample,
    stochastic_forward,
    token_log_probs,
)
from safe_rlhf_v.train.rollout_engine import HFEngine, PromptBatch, RolloutEngine, VLLMEngine

log = get_logger(__name__)
PTX_MAX_LENGTH = 4096  # PTX rows are instruction data: their prompts plus answers fit well inside this


@dataclass(frozen=True)
class Signals:
    """What a step reports beyond the losses: per-token KL and both advantages, (B, T)."""

    kl: torch.Tensor
    reward_advantages: torch.Tensor
    cost_advantages: torch.Tensor


@dataclass(frozen=True)
class PPOModels:
    """Where each role starts from."""

    actor: str
    reward: str
    cost: str
    reward_critic: str
    cost_critic: str

    @classmethod
    def critics_from_scores(cls, actor: str, reward: str, cost: str) -> PPOModels:
        """The roles when the critics start from the reward and cost models (the stage's default)."""
        return cls(actor=actor, reward=reward, cost=cost, reward_critic=reward, cost_critic=cost)


def prompt_table(dataset: datasets.Dataset) -> datasets.Dataset:
    """Unique (image, question) prompts of a paired or flattened split, keeping `category` and
    `image_severity` for per-category reports."""
    keep = [c for c in ("image", "question", "category", "image_severity") if c in dataset.column_names]
    return dataset.select_columns(keep)


def freeze_vision_tower(policy: PreTrainedModel) -> PreTrainedModel:
    """Stop gradients into `policy`'s image encoder but not into its projector, which Qwen-VL keeps
    inside the tower (its patch merger): the same split the score stages freeze, so that "frozen vision
    tower" means one thing for every family. Returns `policy`."""
    family = family_of(policy.config)
    base = policy.base_model  # where the family's module names are rooted, as in the score backbones
    towers = [name for name in family.vision_tower if _has_submodule(base, name)]
    if not towers:
        raise ValueError(
            f"cannot freeze the vision tower: {type(policy).__name__} has none of {family.vision_tower}"
        )
    projector = {
        id(param)
        for name in family.projector
        if _has_submodule(base, name)
        for param in base.get_submodule(name).parameters()
    }
    for param in base.get_submodule(towers[0]).parameters():
        if id(param) not in projector:
            param.requires_grad_(False)
    return policy


def _has_submodule(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


class Roles:
    """The six models, wrapped for training (Engine) or inference (frozen DeepSpeed engines)."""

    def __init__(self, models: PPOModels, cfg: PPOStageConfig, variant: Variant, total_steps: int) -> None:
        self.processor: ProcessorMixin = load_processor(models.actor)
        for name, path in (("reward", models.reward), ("cost", models.cost)):
            if load_processor(path).tokenizer.get_vocab() != self.processor.tokenizer.get_vocab():
                raise ModelFolderError(
                    f"the {name} model {path} has another tokenizer than the policy {models.actor}; "
                    "rollouts are scored token for token, so train the reward and cost models on the "
                    "policy's base model"
                )

        def load_actor() -> PreTrainedModel:
            policy = load_model(AutoModelForImageTextToText, models.actor)
            return freeze_vision_tower(policy) if cfg.actor_freeze_vision_tower else policy

        actor = build_for_training(cfg.actor, load_actor)
        if cfg.actor_lora is not None:
            lora = cfg.actor_lora
            actor = get_peft_model(
                actor,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                ),
            )
        self.actor = Engine(actor, cfg.actor, total_steps=total_steps, name="actor")
        self.reference = frozen_engine(
            load_model(AutoModelForImageTextToText, models.actor),
            zero_stage=cfg.frozen_zero_stage,
            precision=cfg.actor.precision,
        )
        self.reward_model = frozen_engine(
            ScoreModel.load(models.reward), zero_stage=cfg.frozen_zero_stage, precision=cfg.critic.precision
        )
        self.cost_model = frozen_engine(
            ScoreModel.load(models.cost), zero_stage=cfg.frozen_zero_stage, precision=cfg.critic.precision
        )
        reward_critic = build_for_training(
            cfg.critic, lambda: ScoreModel.load(models.reward_critic, kind="critic")
        )
        self.reward_critic = Engine(reward_critic, cfg.critic, total_steps=total_steps, name="reward_critic")
        self.cost_critic: Engine | None = None
        if variant != "reward-only":
            cost_critic = build_for_training(
                cfg.critic, lambda: ScoreModel.load(models.cost_critic, kind="critic")
            )
            self.cost_critic = Engine(cost_critic, cfg.critic, total_steps=total_steps, name="cost_critic")

    def trained(self) -> dict[str, Engine]:
        engines = {"actor": self.actor, "reward_critic": self.reward_critic}
        if self.cost_critic is not None:
            engines["cost_critic"] = self.cost_critic
        return engines


def _lambda(cfg: PPOStageConfig, variant: Variant) -> LagrangeMultiplier:
    lag = cfg.lagrangian
    if variant == "reward-only":
        return LagrangeMultiplier(init=0.0, maximum=lag.max, lr=lag.lr, threshold=lag.threshold, rule="fixed",
                                  window=lag.episode_cost_window)  # fmt: skip
    return LagrangeMultiplier(
        init=lag.init,
        maximum=lag.max,
        lr=lag.lr,
        threshold=lag.threshold,
        rule="fixed" if variant == "fixed-lambda" else lag.rule,
        window=lag.episode_cost_window,
        delay_steps=lag.update_delay_steps,
    )


class PPOLagrangianTrainer:
    """The training loop; `train()` runs it, resuming from the newest complete checkpoint."""

    def __init__(
        self,
        cfg: PPOStageConfig,
        models: PPOModels,
        prompts: datasets.Dataset,
        *,
        variant: Variant,
        checkpoint_dir: Path,
        checkpoint_key: bytes,
        ptx: datasets.Dataset | None = None,
        sink: MetricsSink | None = None,
    ) -> None:
        self.dist = init_distributed()
        seed_everything(cfg.actor.seed, self.dist.rank)
        self.cfg, self.variant, self.checkpoint_dir = cfg, variant, checkpoint_dir
        self.temperature = policy_temperature(cfg.generation.temperature)
        """The policy's temperature: log-probs, ratio and KL are those of the tempered policy that samples."""
        self.prompts = prompt_table(prompts)
        self.stream = BatchStream(
            len(self.prompts), cfg.prompt_batch_size, seed=cfg.actor.seed, dist=self.dist, what="prompts"
        )
        micro = cfg.prompt_batch_size // cfg.actor.per_device_batch_size * cfg.update_iters
        self.total_steps = cfg.actor.epochs * self.stream.per_epoch
        if cfg.actor.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.actor.max_steps)
        optimizer_steps = max(1, self.total_steps * micro // cfg.actor.gradient_accumulation_steps)
        self.roles = Roles(models, cfg, variant, optimizer_steps)
        self.multiplier = _lambda(cfg, variant)
        self.ptx = ptx
        self.ptx_collator = (
            SupervisedCollator(self.roles.processor, max_length=PTX_MAX_LENGTH) if ptx is not None else None
        )
        self.engine: RolloutEngine = self._rollout_engine()
        """Samples the rollouts; told after every step's actor updates (`update_weights`)."""
        self.log = MetricsLog(sink, is_main=self.dist.rank == 0)
        self.step = 0
        self.position = Position()
        self.checkpoints = Checkpointer(
            checkpoint_dir,
            key=checkpoint_key,
            fingerprint=self._fingerprint(models, len(self.prompts)),
            keep=cfg.actor.keep_checkpoints,
            allow_changed_config=cfg.actor.resume_with_changed_config,
        )
        self.reuse_training_forward = (
            cfg.update_iters == 1
            and cfg.prompt_batch_size == cfg.actor.per_device_batch_size
            and not any(stochastic_forward(engine.module) for engine in self.roles.trained().values())
        )
        """Whether rollouts leave the critics' old values to their first training forward."""

    def _rollout_engine(self) -> RolloutEngine:
        """The engine `rollout.engine` names, sampling with the actor's current weights."""
        with_log_probs = self.cfg.old_log_probs_from == "generation"
        if self.cfg.rollout.engine == "vllm":
            if self.dist.world_size > 1:
                raise ConfigError("train_ppo_lag.rollout.engine=vllm runs on one process only for now")
            return VLLMEngine(
                self.roles.actor.module,
                self.roles.processor,
                self.cfg.generation,
                python=self.cfg.rollout.vllm_python,
                device=self.dist.device,
                dtype=self.roles.actor.dtype,
                with_log_probs=with_log_probs,
                seed=self.cfg.actor.seed,
            )
        return HFEngine(
            self.roles.actor.module,
            self.roles.processor,
            self.cfg.generation,
            device=self.dist.device,
            dtype=self.roles.actor.dtype,
            synced_gpus=self.cfg.actor.zero_stage == 3 and self.dist.world_size > 1,
            cpu_threads=self.cfg.sampling_cpu_threads,
            with_log_probs=with_log_probs,
        )

    def close(self) -> None:
        """Release the rollout engine (a vLLM server process and its files)."""
        self.engine.close()

    def _fingerprint(self, models: PPOModels, rows: int) -> dict[str, Any]:
        """What decides this run's result (see `checkpoint`): the stage settings but the trained
        engines' own (fingerprinted per engine), the closing evaluation's size and how sampling and
        the frozen models run; the models, the variant and the prompts."""
        stage = self.cfg.model_dump(
            exclude={"actor", "critic", "eval_prompts", "sampling_cpu_threads", "frozen_zero_stage"}
        )
        engines = {name: engine_fingerprint(engine) for name, engine in self.roles.trained().items()}
        return {"stage": stage, "models": asdict(models), "variant": self.variant, "rows": rows, **engines}

    # --- rollout ------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Sample answers for `rows` and score them with the frozen roles, and with the critics unless
        `reuse_training_forward` leaves that to the training step."""
        roles = self.roles
        samples = self.engine.sample(PromptBatch.from_rows(rows))
        inputs, prompt_length, mask = samples.inputs, samples.prompt_length, samples.response_mask
        tokens = inputs["input_ids"][:, prompt_length:]
        old_log_probs = samples.log_probs
        if old_log_probs is None:
            actor_logits = response_logits(roles.actor, inputs, prompt_length, self.temperature)
            old_log_probs = token_log_probs(actor_logits, tokens) * mask
        ref_logits = response_logits(roles.reference, inputs, prompt_length, self.temperature)
        rollout = Rollout(
            inputs=inputs,
            prompt_length=prompt_length,
            family=samples.family,
            response_mask=mask,
            old_log_probs=old_log_probs,
            ref_log_probs=token_log_probs(ref_logits, tokens) * mask,
            rewards=roles.reward_model(**inputs).end_scores.float(),
            costs=roles.cost_model(**inputs).end_scores.float(),
        )
        if not self.reuse_training_forward:
            rollout.reward_values = response_values(roles.reward_critic, inputs, prompt_length) * mask
            rollout.cost_values = self._cost_values(rollout)
        return rollout

    def _cost_values(self, rollout: Rollout) -> torch.Tensor:
        """The cost critic's values on the response, masked (zeros in the reward-only ablation)."""
        critic = self.roles.cost_critic
        if critic is None:
            return torch.zeros_like(rollout.response_mask)
        return response_values(critic, rollout.inputs, rollout.prompt_length) * rollout.response_mask

    # --- one PPO-Lagrangian step --------------------------------------------------------------
    def train_step(self, rollout: Rollout) -> dict[str, float]:
        """Lambda update, advantages, actor and critic updates on one rollout batch."""
        cfg, mask = self.cfg, rollout.response_mask
        scored = rollout.has_critic_values
        if not scored and (cfg.update_iters != 1 or rollout.size > cfg.actor.per_device_batch_size):
            raise ConfigError(
                f"a rollout of {rollout.size} rows without the critics' values needs update_iters=1 and "
                f"one micro-batch (actor.per_device_batch_size >= {rollout.size}); got "
                f"update_iters={cfg.update_iters}, per_device_batch_size={cfg.actor.per_device_batch_size}"
            )
        self.multiplier.record(rollout.costs.tolist())
        expected_cost = all_reduce_mean(self.multiplier.local_mean_cost())
        lam = self.multiplier.update(expected_cost, self.step)
        if scored:
            signals, metrics = self._update_on_rollout(rollout, lam)
        else:
            signals, metrics = self._update_reusing_forward(rollout, lam)
        self.engine.update_weights(self.roles.actor.module)
        lengths = mask.sum(dim=1)
        metrics |= {
            "reward": all_reduce_mean(rollout.rewards.mean()),
            "cost": all_reduce_mean(rollout.costs.mean()),
            "harmful_share": all_reduce_mean((rollout.costs > 0).float().mean()),
            "J_C": expected_cost,
            "threshold": cfg.lagrangian.threshold,
            "lambda": lam,
            "kl": all_reduce_mean((signals.kl * mask).sum(dim=1).mean()),
            "reward_advantage": float(masked_mean(signals.reward_advantages, mask)),
            "cost_advantage": float(masked_mean(signals.cost_advantages, mask)),
            "generated_length": all_reduce_mean(lengths.float().mean()),
            "actor_lr": self.roles.actor.lr,
        }
        return metrics

    def _update_on_rollout(self, rollout: Rollout, lam: float) -> tuple[Signals, dict[str, float]]:
        """Advantages from the rollout's old log-probs and values, then `update_iters` passes over its
        micro-batches, each one actor update and one update per critic; returns the mean losses."""
        old_log_probs = rollout.old_log_probs
        reward_values, cost_values = rollout.critic_values()
        kl = old_log_probs - rollout.ref_log_probs
        reward_adv, reward_returns = self._gae(rollout, kl, reward_values, cost=False)
        cost_adv, cost_returns = self._gae(rollout, kl, cost_values, cost=True)
        advantages = combined_advantage(reward_adv, cost_adv, lam)
        critics = (
            ("reward_critic_loss", self.roles.reward_critic, reward_values, reward_returns),
            ("cost_critic_loss", self.roles.cost_critic, cost_values, cost_returns),
        )
        totals: dict[str, float] = {}
        size = self.cfg.actor.per_device_batch_size
        passes = 0
        for _ in range(self.cfg.update_iters):
            for start in range(0, rollout.size, size):
                rows = slice(start, start + size)
                part = rollout.slice(rows)
                logits, log_probs = self._actor_forward(part)
                out = self._actor_update(part, logits, log_probs, old_log_probs[rows], advantages[rows])
                for name, critic, old_values, returns in critics:
                    if critic is not None:
                        values = response_values(critic, part.inputs, part.prompt_length)
                        out[name] = self._critic_update(critic, part, values, old_values[rows], returns[rows])
                totals = _add(totals, out)
                passes += 1
        return Signals(kl, reward_adv, cost_adv), {key: value / passes for key, value in totals.items()}

    def _update_reusing_forward(self, rollout: Rollout, lam: float) -> tuple[Signals, dict[str, float]]:
        """One update per critic, with its old values read from its own training forward, then the
        actor's, whose loss needs both critics' advantages."""
        mask = rollout.response_mask
        old_log_probs = rollout.old_log_probs
        kl = old_log_probs - rollout.ref_log_probs
        out: dict[str, float] = {}
        advantages: dict[str, torch.Tensor] = {}
        for signal, critic in (("reward", self.roles.reward_critic), ("cost", self.roles.cost_critic)):
            cost = signal == "cost"
            if critic is None:  # reward-only: the cost advantage is reported, lambda = 0 leaves it out
                advantages[signal], _ = self._gae(rollout, kl, torch.zeros_like(mask), cost=cost)
                continue
            values = response_values(critic, rollout.inputs, rollout.prompt_length)
            old_values = values.detach() * mask
            advantages[signal], returns = self._gae(rollout, kl, old_values, cost=cost)
            out[f"{signal}_critic_loss"] = self._critic_update(critic, rollout, values, old_values, returns)
        reward_adv, cost_adv = advantages["reward"], advantages["cost"]
        combined = combined_advantage(reward_adv, cost_adv, lam)
        logits, log_probs = self._actor_forward(rollout)
        out |= self._actor_update(rollout, logits, log_probs, old_log_probs, combined)
        return Signals(kl, reward_adv, cost_adv), out

    def _gae(
        self, rollout: Rollout, kl: torch.Tensor, values: torch.Tensor, *, cost: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, returns) of the cost signal (KL charged) or of the reward signal (KL penalised)."""
        cfg, mask = self.cfg, rollout.response_mask
        end_scores, sign = (rollout.costs, 1.0) if cost else (rollout.rewards, -1.0)
        signal = shaped_rewards(kl, end_scores, mask, cfg.kl_coeff, cfg.clip_range_score, sign=sign)
        return gae(signal, values, mask, cfg.gamma, cfg.gae_lambda)

    def _actor_forward(self, part: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The actor's response logits and the log-probs of the sampled tokens, with autograd."""
        logits = response_logits(self.roles.actor, part.inputs, part.prompt_length, self.temperature)
        return logits, token_log_probs(logits, part.inputs["input_ids"][:, part.prompt_length :])

    def _actor_update(
        self,
        part: Rollout,
        logits: torch.Tensor,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
    ) -> dict[str, float]:
        """One optimizer step on the clipped surrogate, plus `ptx_coeff` times the PTX loss when
        configured: both gradients go into the same step, so the LR schedule's horizon (one step per
        micro-batch) holds with PTX too. Reports entropy and clip fraction."""
        mask = part.response_mask
        actor_loss, clip_fraction = ppo_actor_loss(
            log_probs, old_log_probs, advantages, mask, self.cfg.clip_range_ratio
        )
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            entropy = masked_mean(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1), mask)
        out = {"actor_loss": float(actor_loss.detach()), "clip_fraction": float(clip_fraction),
               "entropy": float(entropy)}  # fmt: skip
        loss = actor_loss
        if self.ptx is not None:
            ptx_loss = self._ptx_loss()
            out["ptx_loss"] = float(ptx_loss.detach())
            loss = actor_loss + self.cfg.ptx_coeff * ptx_loss
        self._step(self.roles.actor, loss)
        return out

    def _critic_update(
        self,
        critic: Engine,
        part: Rollout,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
    ) -> float:
        """The clipped value-loss step of one critic on its forward's `values`."""
        loss = critic_loss(values, old_values, returns, part.response_mask, self.cfg.clip_range_value)
        return self._step(critic, loss)

    def _ptx_loss(self) -> torch.Tensor:
        """The supervised PTX loss on a batch of the PTX data (with autograd)."""
        assert self.ptx is not None and self.ptx_collator is not None
        generator = torch.Generator().manual_seed(self.cfg.actor.seed + self.step)
        rows = torch.randint(len(self.ptx), (self.cfg.actor.per_device_batch_size,), generator=generator)
        batch = self.ptx_collator([self.ptx[int(i)] for i in rows])
        batch = {k: v.to(self.dist.device) for k, v in batch.items()}
        return self.roles.actor(**batch, use_cache=False).loss.float()

    def _step(self, engine: Engine, loss: torch.Tensor) -> float:
        check_finite(
            loss,
            name=engine.name,
            where=f"PPO step {self.step}",
            checkpoint_dir=self.checkpoint_dir,
            hint="lower the learning rate or kl_coeff",
        )
        engine.backward_and_step(loss)
        return float(loss.detach())

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        """Every trained engine and the loop's state (step, data position, lambda and its cost window,
        the metric history) as one sealed checkpoint of this step."""
        state = {
            "position": asdict(self.position),
            "lagrangian": self.multiplier.state_dict(),
            "history": self.log.records,
        }
        self.checkpoints.save(self.step, self.roles.trained(), state)

    def resume(self) -> None:
        """Continue from the newest sealed checkpoint, where every engine has the same step."""
        state = self.checkpoints.restore(self.roles.trained())
        if state is None:
            return
        self.step = int(state["step"])
        self.position = Position(**state["position"])
        self.multiplier.load_state_dict(state["lagrangian"])
        self.log.records = state["history"]
        self.engine.update_weights(self.roles.actor.module)  # the restored weights, not the initial ones
        log.info("resumed PPO-Lagrangian at step %d (lambda %.4g)", self.step, self.multiplier.value)

    @property
    def history(self) -> list[dict[str, float]]:
        """Every step's figures as `{"step": N, "lambda": ..., "J_C": ...}`, the restored steps
        included (what history.json and the report's lambda / J_C chart show)."""
        return [
            {key.removeprefix("train/"): value for key, value in record.items()}
            for record in self.log.records
        ]

    # --- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run (or resume) every step; returns the last step's metrics, also when it ran before a restart."""
        self.resume()
        cadence = self.cfg.actor.checkpoint_every_steps
        while not reached(self.step, self.total_steps):
            epoch, done = self.position.epoch, self.position.batches_done
            indices = self.stream.epoch_batches(epoch)[done]
            metrics = self.train_step(self.rollout([self.prompts[i] for i in indices]))
            self.step += 1
            self.position = self.stream.after(epoch, done + 1)
            if log_due(self.step, self.cfg.actor.log_every_steps):
                log.info("ppo step %d/%d: %s", self.step, self.total_steps, format_metrics(metrics))
            self.log.emit({f"train/{k}": v for k, v in metrics.items()}, self.step)
            if every(self.step, cadence) or self.step == self.total_steps:
                self.save()
        last = self.history[-1] if self.history else {}
        return {key: value for key, value in last.items() if key != "step"}

    def save_actor(self, out_dir: Path | None) -> None:
        """Write the trained policy (LoRA adapters merged in) as a Hugging Face folder on rank 0.

        Every rank must call it (ZeRO-3 gathers the weights); `out_dir` is only used on rank 0.
        """
        weights = self.roles.actor.state_dict_for_save()
        if self.dist.rank != 0 or out_dir is None:
            return
        module = self.roles.actor.module
        if isinstance(module, PeftModel):
            module.merge_and_unload().save_pretrained(out_dir)
        else:
            module.save_pretrained(out_dir, state_dict=weights)
        self.roles.processor.save_pretrained(out_dir)


def _add(totals: dict[str, float], values: dict[str, float]) -> dict[str, float]:
    return {key: totals.get(key, 0.0) + values.get(key, 0.0) for key in totals.keys() | values.keys()}


@torch.no_grad()
def quick_eval(
    trainer: PPOLagrangianTrainer, prompts: datasets.Dataset, batch_size: int, *, ground_truth: bool = False
) -> dict[str, float]:
    """Mean reward, mean cost and harmful share (cost > 0) of the initial and the trained policy on
    held-out prompts, with the rollout's sampling settings and one seed for both policies.

    With `ground_truth` (synthetic data only) the synthetic world's exact judge grades the decoded
    answers too: harmful share (all prompts and harmful-image ones), off-distribution share, mean
    helpfulness rate and the trained policy's helpfulness win rate over the initial one (ties count
    half), so the closing check does not rest on the models the policy was trained against.
    """
    roles, gen = trainer.roles, trainer.cfg.generation
    table = prompt_table(prompts)
    tokenizer = roles.processor.tokenizer
    results: dict[str, float] = {}
    verdicts: dict[str, list[TruthVerdict]] = {}
    for name, policy in (("initial", roles.reference.module), ("trained", roles.actor.module)):
        torch.manual_seed(trainer.cfg.actor.seed)
        rewards, costs, answers = [], [], []
        policy.eval()
        for start in range(0, len(table), batch_size):
            rows = [table[i] for i in range(start, min(start + batch_size, len(table)))]
            samples = sample(
                policy,
                roles.processor,
                [r["image"] for r in rows],
                [r["question"] for r in rows],
                max_new_tokens=gen.max_new_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                device=trainer.dist.device,
                dtype=roles.actor.dtype,
                cpu_threads=trainer.cfg.sampling_cpu_threads,
            )
            rewards.append(roles.reward_model(**samples.inputs).end_scores.float().cpu())
            costs.append(roles.cost_model(**samples.inputs).end_scores.float().cpu())
            tokens = samples.inputs["input_ids"][:, samples.prompt_length :]
            answers += [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        reward, cost = torch.cat(rewards), torch.cat(costs)
        results |= {
            f"{name}_reward": float(reward.mean()),
            f"{name}_cost": float(cost.mean()),
            f"{name}_harmful_share": float((cost > 0).float().mean()),
        }
        if ground_truth:
            verdicts[name] = [
                judge(answer, category, int(severity))
                for answer, category, severity in zip(
                    answers, table["category"], table["image_severity"], strict=True
                )
            ]
            results |= {
                f"{name}_truth_{key}": value for key, value in _truth_figures(table, verdicts[name]).items()
            }
    if ground_truth:
        duel = win_rate(
            [v.helpful_rate for v in verdicts["trained"]],
            [v.helpful_rate for v in verdicts["initial"]],
            higher_is_better=True,
        )
        results["truth_win_rate_helpfulness"] = duel["rate"]
    roles.actor.module.train()
    return results


def _truth_figures(table: datasets.Dataset, verdicts: list[TruthVerdict]) -> dict[str, float]:
    """Shares and mean helpfulness of one policy's answers by the synthetic world's exact judge."""
    on_harmful = [
        v.harmful for v, severity in zip(verdicts, table["image_severity"], strict=True) if severity
    ]
    return {
        "harmful_share": sum(v.harmful for v in verdicts) / len(verdicts),
        "harmful_share_on_harmful_images": sum(on_harmful) / max(len(on_harmful), 1),
        "off_distribution_share": sum(v.off_distribution for v in verdicts) / len(verdicts),
        "helpful_rate": sum(v.helpful_rate for v in verdicts) / len(verdicts),
    }
