"""Stage `train-ppo-lag`: Safe RLHF-V fine-tuning of the policy (or an ablation variant).

Inputs: validate-data's output (train prompts; evaluation prompts for the closing check), the
reward and cost model folders. Output, a Hugging Face policy folder plus:

    lineage.json      data digests, the initial policy, reward and cost model digests, the variant
    metrics.json      the closing evaluation: initial vs trained reward, cost, harmful share
    history.json      per-step training metrics (lambda, J_C, reward, cost, KL, ...) for reports
    result.json       the stage result
"""

from __future__ import annotations

import mlflow

from safe_rlhf_v import work_dir as layout
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.records import VARIANTS, StageResult, Variant
from safe_rlhf_v.stages.context import open_stage
from safe_rlhf_v.tracking import log_config
from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels, quick_eval

STAGE = "train-ppo-lag"


class UnknownVariant(UserError, ValueError):
    """A PPO variant name that is not one of `records.VARIANTS`."""


def run(
    cfg: PipelineConfig,
    data_uri: str,
    reward_model: str,
    cost_model: str,
    out_uri: str,
    *,
    variant: Variant = "safe-rlhf-v",
    pipeline_run_id: str | None = None,
    base_model: str | None = None,
) -> StageResult:
    """Fine-tune the policy with PPO-Lagrangian (or `variant`) and publish it to `out_uri`."""
    if variant not in VARIANTS:
        raise UnknownVariant(f"unknown PPO variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    section = cfg.train_ppo_lag
    policy = base_model or cfg.base_model
    inputs = {
        "--data": data_uri,
        "--reward-model": reward_model,
        "--cost-model": cost_model,
        "policy": policy,
        "train_ppo_lag.ptx_data": section.ptx_data or "",
    }
    name = f"{STAGE}/{variant}"
    with open_stage(
        STAGE, cfg, out_uri, inputs=inputs, pipeline_run_id=pipeline_run_id, run_name=name, distributed=True
    ) as ctx:
        if ctx.main:
            log_config(section, f"{STAGE}.")
            mlflow.log_params({"variant": variant, "base_model": policy})
        digests, splits = ctx.load_validated(data_uri)
        held_out = splits["evaluation"].select(range(min(section.eval_prompts, len(splits["evaluation"]))))
        cache = layout.data_cache(ctx.work_dir)
        ptx = load_split(section.ptx_data, "train", cache_dir=cache) if section.ptx_data else None
        models = PPOModels(
            actor=ctx.model(policy),
            reward=ctx.model(reward_model),
            cost=ctx.model(cost_model),
            reward_critic=ctx.model(section.reward_critic_model or reward_model),
            cost_critic=ctx.model(section.cost_critic_model or cost_model),
        )
        trainer = PPOLagrangianTrainer(
            section,
            models,
            splits["train"],
            variant=variant,
            checkpoint_dir=ctx.checkpoint_dir(f"{STAGE}-{variant}"),
            checkpoint_key=ctx.checkpoint_key(),
            ptx=ptx,
            sink=ctx.log_step,
        )
        try:
            last = trainer.train()
        finally:
            trainer.close()  # a vLLM rollout server must not outlive the stage, failed or not
        evaluation = quick_eval(
            trainer,
            held_out,
            batch_size=section.prompt_batch_size * 4,
            ground_truth=cfg.evaluate.ground_truth,
        )
        trainer.save_actor(ctx.out)
        metrics = evaluation | {"final_lambda": last.get("lambda", 0.0), "final_J_C": last.get("J_C", 0.0)}
        lineage = ctx.lineage(
            "policy",
            data_uri=data_uri,
            digests=digests,
            base_model=policy,
            variant=variant,
            reward_model=reward_model,
            cost_model=cost_model,
        )
        return ctx.finish(
            metrics,
            lineage=lineage,
            outputs={"model": ctx.out_uri or out_uri},
            details={"variant": variant},
            files={"metrics.json": metrics, "history.json": trainer.history},
            artifacts=["metrics.json", "history.json"],
            artifact_path=name,
        )
