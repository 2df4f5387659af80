"""Safe RLHF-V: PPO with a Lagrangian harm budget, on the DeepSpeed engine, CPU and GPU alike.

Six roles: the actor (trained), the reference (frozen copy of the initial actor), the reward and cost
models (frozen, from `train-reward` / `train-cost`), and the reward and cost critics (trained,
initialised from the reward and cost models unless configured otherwise). One step:

1. rollout: sample answers to a batch of prompts; score them (reward, cost at the last real token),
   log-probabilities of actor and reference, values of both critics;
2. per-token signals `r_t = -beta kl_t (+ reward at the end)`, `c_t = +beta kl_t (+ cost at the end)`,
   GAE for each with the response mask;
3. lambda update from J_C (the mean of the last `window` episode costs, averaged over ranks);
4. actor update on `(A_r - lambda A_c) / (1 + lambda)` with the clipped surrogate (plus the PTX loss
   when configured), then the two clipped critic updates.

Variants (ablations through config): `reward-only` (lambda fixed at 0, no cost critic) and
`fixed-lambda` (lambda stays at its initial value).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DistributedSampler
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from safe_rlhf_v.config import PPOStageConfig, PPOVariant
from safe_rlhf_v.data.collate import SupervisedCollator
from safe_rlhf_v.models.score import ScoreModel
from safe_rlhf_v.storage import atomic_write_text
from safe_rlhf_v.train.distributed import (
    Engine,
    all_reduce_mean,
    barrier,
    frozen_engine,
    get_logger,
    init_distributed,
    model_init_context,
    seed_everything,
    train_ds_config,
)
from safe_rlhf_v.train.lagrangian import LagrangeMultiplier
from safe_rlhf_v.train.losses import (
    combined_advantage,
    critic_loss,
    gae,
    masked_mean,
    ppo_actor_loss,
    shaped_rewards,
)
from safe_rlhf_v.train.rollout import Rollout, response_logits, response_values, sample, token_log_probs

log = get_logger(__name__)
MetricsSink = Callable[[dict[str, float], int], None]
STATE_DIR = "state"
PTX_MAX_LENGTH = 4096  # PTX rows are instruction data: their prompts plus answers fit well inside this


@dataclass(frozen=True)
class PPOModels:
    """Where each role starts from."""

    actor: str
    reward: str
    cost: str
    reward_critic: str
    cost_critic: str


def prompt_table(dataset: datasets.Dataset) -> datasets.Dataset:
    """Unique (image, question) prompts of a paired or flattened split, keeping `category` and
    `image_severity` for per-category reports."""
    keep = [c for c in ("image", "question", "category", "image_severity") if c in dataset.column_names]
    return dataset.select_columns(keep)


class Roles:
    """The six models, wrapped for training (Engine) or inference (frozen DeepSpeed engines)."""

    def __init__(self, models: PPOModels, cfg: PPOStageConfig, variant: PPOVariant, total_steps: int) -> None:
        dist = init_distributed()
        self.processor: ProcessorMixin = AutoProcessor.from_pretrained(models.actor)
        tokenizers = {name: AutoProcessor.from_pretrained(path).tokenizer for name, path in
                      (("reward", models.reward), ("cost", models.cost))}  # fmt: skip
        for name, tokenizer in tokenizers.items():
            if tokenizer.get_vocab() != self.processor.tokenizer.get_vocab():
                raise ValueError(
                    f"the {name} model's tokenizer differs from the actor's; rollouts are scored token for "
                    "token, so train the reward and cost models on the actor's base model"
                )
        actor_ds = train_ds_config(cfg.actor, dist.world_size, dist.device.type)
        with model_init_context(actor_ds):
            actor = AutoModelForImageTextToText.from_pretrained(models.actor)
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
            AutoModelForImageTextToText.from_pretrained(models.actor),
            zero_stage=cfg.frozen_zero_stage,
            precision=cfg.actor.precision,
        )
        self.reward_model = frozen_engine(
            ScoreModel.load(models.reward), zero_stage=cfg.frozen_zero_stage, precision=cfg.critic.precision
        )
        self.cost_model = frozen_engine(
            ScoreModel.load(models.cost), zero_stage=cfg.frozen_zero_stage, precision=cfg.critic.precision
        )
        critic_ds = train_ds_config(cfg.critic, dist.world_size, dist.device.type)
        with model_init_context(critic_ds):
            reward_critic = ScoreModel.load(models.reward_critic, kind="critic")
        self.reward_critic = Engine(reward_critic, cfg.critic, total_steps=total_steps, name="reward_critic")
        self.cost_critic: Engine | None = None
        if variant != "reward-only":
            with model_init_context(critic_ds):
                cost_critic = ScoreModel.load(models.cost_critic, kind="critic")
            self.cost_critic = Engine(cost_critic, cfg.critic, total_steps=total_steps, name="cost_critic")

    def trained(self) -> dict[str, Engine]:
        engines = {"actor": self.actor, "reward_critic": self.reward_critic}
        if self.cost_critic is not None:
            engines["cost_critic"] = self.cost_critic
        return engines


def _lambda(cfg: PPOStageConfig, variant: PPOVariant) -> LagrangeMultiplier:
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
        variant: PPOVariant,
        checkpoint_dir: Path,
        ptx: datasets.Dataset | None = None,
        sink: MetricsSink | None = None,
    ) -> None:
        self.dist = init_distributed()
        seed_everything(cfg.actor.seed, self.dist.rank)
        self.cfg, self.variant, self.checkpoint_dir = cfg, variant, checkpoint_dir
        self.prompts = prompt_table(prompts)
        self.sampler = DistributedSampler(
            range(len(self.prompts)),
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            shuffle=True,
            seed=cfg.actor.seed,
            drop_last=True,
        )
        self.batches_per_epoch = len(self.sampler) // cfg.prompt_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(self.prompts)} prompts give no full rollout batch of {cfg.prompt_batch_size} "
                f"per process on {self.dist.world_size} process(es); lower prompt_batch_size"
            )
        micro = cfg.prompt_batch_size // cfg.actor.per_device_batch_size * cfg.update_iters
        self.total_steps = cfg.actor.epochs * self.batches_per_epoch
        if cfg.actor.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.actor.max_steps)
        optimizer_steps = max(1, self.total_steps * micro // cfg.actor.gradient_accumulation_steps)
        self.roles = Roles(models, cfg, variant, optimizer_steps)
        self.multiplier = _lambda(cfg, variant)
        self.ptx = ptx
        self.ptx_collator = (
            SupervisedCollator(self.roles.processor, max_length=PTX_MAX_LENGTH) if ptx is not None else None
        )
        self.emit = sink if (sink is not None and self.dist.rank == 0) else (lambda metrics, step: None)
        self.step = 0

    # --- rollout ------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, rows: list[dict[str, Any]]) -> Rollout:
        """Sample answers for `rows` and score them with every role."""
        roles, gen = self.roles, self.cfg.generation
        actor = roles.actor.module
        actor.eval()
        inputs, prompt_length, mask = sample(
            actor,
            roles.processor,
            [r["image"] for r in rows],
            [r["question"] for r in rows],
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            device=self.dist.device,
            dtype=roles.actor.dtype,
            synced_gpus=self.cfg.actor.zero_stage == 3 and self.dist.world_size > 1,
        )
        actor.train()
        tokens = inputs["input_ids"][:, prompt_length:]
        old = token_log_probs(response_logits(roles.actor, inputs, prompt_length), tokens)
        ref = token_log_probs(response_logits(roles.reference, inputs, prompt_length), tokens)
        cost_values = (
            response_values(roles.cost_critic, inputs, prompt_length)
            if roles.cost_critic is not None
            else torch.zeros_like(old)
        )
        return Rollout(
            inputs=inputs,
            prompt_length=prompt_length,
            response_mask=mask,
            old_log_probs=old * mask,
            ref_log_probs=ref * mask,
            reward_values=response_values(roles.reward_critic, inputs, prompt_length) * mask,
            cost_values=cost_values * mask,
            rewards=roles.reward_model(**inputs).end_scores.float(),
            costs=roles.cost_model(**inputs).end_scores.float(),
        )

    # --- one PPO-Lagrangian step --------------------------------------------------------------
    def train_step(self, rollout: Rollout) -> dict[str, float]:
        """Advantages, lambda update, actor and critic updates on one rollout batch."""
        cfg, mask = self.cfg, rollout.response_mask
        kl = rollout.old_log_probs - rollout.ref_log_probs
        rewards = shaped_rewards(kl, rollout.rewards, mask, cfg.kl_coeff, cfg.clip_range_score, sign=-1.0)
        costs = shaped_rewards(kl, rollout.costs, mask, cfg.kl_coeff, cfg.clip_range_score, sign=1.0)
        reward_adv, reward_returns = gae(rewards, rollout.reward_values, mask, cfg.gamma, cfg.gae_lambda)
        cost_adv, cost_returns = gae(costs, rollout.cost_values, mask, cfg.gamma, cfg.gae_lambda)

        self.multiplier.record(rollout.costs.tolist())
        expected_cost = all_reduce_mean(self.multiplier.local_mean_cost())
        lam = self.multiplier.update(expected_cost, self.step)
        advantages = combined_advantage(reward_adv, cost_adv, lam)

        totals: dict[str, float] = {"actor_loss": 0.0, "reward_critic_loss": 0.0, "cost_critic_loss": 0.0,
                                    "clip_fraction": 0.0, "entropy": 0.0, "ptx_loss": 0.0}  # fmt: skip
        size = cfg.actor.per_device_batch_size
        passes = 0
        for _ in range(cfg.update_iters):
            for start in range(0, rollout.size, size):
                rows = slice(start, start + size)
                part = rollout.slice(rows)
                totals = _add(
                    totals, self._update(part, advantages[rows], reward_returns[rows], cost_returns[rows])
                )
                passes += 1
        metrics = {key: value / passes for key, value in totals.items()}
        lengths = mask.sum(dim=1)
        metrics |= {
            "reward": all_reduce_mean(rollout.rewards.mean()),
            "cost": all_reduce_mean(rollout.costs.mean()),
            "harmful_share": all_reduce_mean((rollout.costs > 0).float().mean()),
            "J_C": expected_cost,
            "threshold": cfg.lagrangian.threshold,
            "lambda": lam,
            "kl": all_reduce_mean((kl * mask).sum(dim=1).mean()),
            "reward_advantage": float(masked_mean(reward_adv, mask)),
            "cost_advantage": float(masked_mean(cost_adv, mask)),
            "generated_length": all_reduce_mean(lengths.float().mean()),
            "actor_lr": self.roles.actor.lr,
        }
        if self.roles.cost_critic is None:
            metrics.pop("cost_critic_loss")
        if self.ptx is None:
            metrics.pop("ptx_loss")
        return metrics

    def _update(
        self,
        part: Rollout,
        advantages: torch.Tensor,
        reward_returns: torch.Tensor,
        cost_returns: torch.Tensor,
    ) -> dict[str, float]:
        cfg, roles, mask = self.cfg, self.roles, part.response_mask
        tokens = part.inputs["input_ids"][:, part.prompt_length :]
        logits = response_logits(roles.actor, part.inputs, part.prompt_length)
        log_probs = token_log_probs(logits, tokens)
        actor_loss, clip_fraction = ppo_actor_loss(
            log_probs, part.old_log_probs, advantages, mask, cfg.clip_range_ratio
        )
        with torch.no_grad():
            probs = torch.softmax(logits.float(), dim=-1)
            entropy = masked_mean(-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1), mask)
        out = {"actor_loss": self._step(roles.actor, actor_loss), "clip_fraction": float(clip_fraction),
               "entropy": float(entropy)}  # fmt: skip
        if self.ptx is not None:
            out["ptx_loss"] = self._ptx_step()
        values = response_values(roles.reward_critic, part.inputs, part.prompt_length)
        loss = critic_loss(values, part.reward_values, reward_returns, mask, cfg.clip_range_value)
        out["reward_critic_loss"] = self._step(roles.reward_critic, loss)
        if roles.cost_critic is not None:
            values = response_values(roles.cost_critic, part.inputs, part.prompt_length)
            loss = critic_loss(values, part.cost_values, cost_returns, mask, cfg.clip_range_value)
            out["cost_critic_loss"] = self._step(roles.cost_critic, loss)
        return out

    def _ptx_step(self) -> float:
        """The supervised PTX loss on a batch of the PTX data, weighted by `ptx_coeff`."""
        assert self.ptx is not None and self.ptx_collator is not None
        generator = torch.Generator().manual_seed(self.cfg.actor.seed + self.step)
        rows = torch.randint(len(self.ptx), (self.cfg.actor.per_device_batch_size,), generator=generator)
        batch = self.ptx_collator([self.ptx[int(i)] for i in rows])
        batch = {k: v.to(self.dist.device) for k, v in batch.items()}
        loss = self.roles.actor(**batch, use_cache=False).loss.float()
        return self._step(self.roles.actor, self.cfg.ptx_coeff * loss) / self.cfg.ptx_coeff

    def _step(self, engine: Engine, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{engine.name}: loss is {loss.item()} at PPO step {self.step}; the last good checkpoint is "
                f"kept under {self.checkpoint_dir}: lower the learning rate or kl_coeff and resume"
            )
        engine.backward_and_step(loss)
        return float(loss.detach())

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        """Every trained engine at this step, then the JSON state (lambda, cost window, step) last, so a
        state file only exists for steps whose engines were all saved."""
        for name, engine in self.roles.trained().items():
            engine.save_checkpoint(self.checkpoint_dir / name, client_state={"step": self.step})
        if self.dist.rank == 0:
            state = {"step": self.step, "lagrangian": self.multiplier.state_dict()}
            atomic_write_text(self.checkpoint_dir / STATE_DIR / f"step-{self.step}.json", json.dumps(state))
        barrier()

    def resume(self) -> None:
        """Load the newest step whose engines and state were all saved; keep going from scratch otherwise."""
        states = sorted(
            (self.checkpoint_dir / STATE_DIR).glob("step-*.json"),
            key=lambda p: int(p.stem.split("-")[1]),
            reverse=True,
        )
        for path in states:
            step = int(path.stem.split("-")[1])
            loaded = [engine.load_latest(self.checkpoint_dir / name, step=step)
                      for name, engine in self.roles.trained().items()]  # fmt: skip
            if all(state is not None for state in loaded):
                state = json.loads(path.read_text())
                self.multiplier.load_state_dict(state["lagrangian"])
                self.step = int(state["step"])
                log.info("resumed PPO-Lagrangian at step %d (lambda %.4g)", self.step, self.multiplier.value)
                return
            log.warning(
                "checkpoint step %d is incomplete (an engine is missing it); trying an older one", step
            )

    # --- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """Run (or resume) every step; returns the last step's metrics."""
        self.resume()
        metrics: dict[str, float] = {}
        every = self.cfg.actor.checkpoint_every_steps
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.batches_per_epoch)
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            size = self.cfg.prompt_batch_size
            rows = [self.prompts[i] for i in order[position * size : (position + 1) * size]]
            metrics = self.train_step(self.rollout(rows))
            self.step += 1
            if self.step % self.cfg.actor.log_every_steps == 0 or self.step == 1:
                log.info("ppo step %d/%d: %s", self.step, self.total_steps, _fmt(metrics))
            self.emit({f"train/{k}": v for k, v in metrics.items()}, self.step)
            if (every and self.step % every == 0) or self.step == self.total_steps:
                self.save()
        return metrics

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


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if math.isfinite(v))


@torch.no_grad()
def quick_eval(trainer: PPOLagrangianTrainer, prompts: datasets.Dataset, batch_size: int) -> dict[str, float]:
    """Mean reward, mean cost and harmful share (cost > 0) of the initial and the trained policy on
    held-out prompts, with the rollout's sampling settings and one seed for both policies."""
    roles, gen = trainer.roles, trainer.cfg.generation
    table = prompt_table(prompts)
    results: dict[str, float] = {}
    for name, policy in (("initial", roles.reference.module), ("trained", roles.actor.module)):
        torch.manual_seed(trainer.cfg.actor.seed)
        rewards, costs = [], []
        policy.eval()
        for start in range(0, len(table), batch_size):
            rows = [table[i] for i in range(start, min(start + batch_size, len(table)))]
            inputs, _, _ = sample(
                policy,
                roles.processor,
                [r["image"] for r in rows],
                [r["question"] for r in rows],
                max_new_tokens=gen.max_new_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                device=trainer.dist.device,
                dtype=roles.actor.dtype,
            )
            rewards.append(roles.reward_model(**inputs).end_scores.float().cpu())
            costs.append(roles.cost_model(**inputs).end_scores.float().cpu())
        reward, cost = torch.cat(rewards), torch.cat(costs)
        results |= {
            f"{name}_reward": float(reward.mean()),
            f"{name}_cost": float(cost.mean()),
            f"{name}_harmful_share": float((cost > 0).float().mean()),
        }
    roles.actor.module.train()
    return results
