"""Stage `train-ppo-lag`: Safe RLHF-V fine-tuning of the policy (or an ablation variant).

Inputs: validate-data's output (train prompts; evaluation prompts for the closing check), the
reward and cost model folders. Output, a Hugging Face policy folder plus:

    lineage.json      data digests, the initial policy, reward and cost model digests, the variant
    metrics.json      the closing evaluation: initial vs trained reward, cost, harmful share
    history.json      per-step training metrics (lambda, J_C, reward, cost, KL, ...) for reports
    result.json       the stage result
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import asdict
from pathlib import Path

import mlflow

from safe_rlhf_v import tracking
from safe_rlhf_v.config import PipelineConfig, PPOVariant
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.stages.common import RESULT_FILE, StageResult, local_model, staged_output, write_json
from safe_rlhf_v.stages.lineage import dataset_digests, model_digest, validated_dataset_uri, write_lineage
from safe_rlhf_v.stages.train_score import checkpoint_dir
from safe_rlhf_v.train.distributed import init_distributed
from safe_rlhf_v.train.integrity import checkpoint_key
from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels, quick_eval

STAGE = "train-ppo-lag"
VARIANTS: tuple[PPOVariant, ...] = ("safe-rlhf-v", "reward-only", "fixed-lambda")


def run(
    cfg: PipelineConfig,
    data_uri: str,
    reward_model: str,
    cost_model: str,
    out_uri: str,
    *,
    variant: PPOVariant = "safe-rlhf-v",
    pipeline_run_id: str | None = None,
    base_model: str | None = None,
) -> StageResult:
    """Fine-tune the policy with PPO-Lagrangian (or `variant`) and publish it to `out_uri`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown PPO variant {variant!r}; choose one of {VARIANTS}")
    dist = init_distributed()
    main = dist.rank == 0
    section = cfg.train_ppo_lag
    pipeline_run_id = pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}"
    policy = base_model or cfg.base_model
    models = PPOModels(
        actor=local_model(policy, cfg.work_dir),
        reward=local_model(reward_model, cfg.work_dir),
        cost=local_model(cost_model, cfg.work_dir),
        reward_critic=local_model(section.reward_critic_model or reward_model, cfg.work_dir),
        cost_critic=local_model(section.cost_critic_model or cost_model, cfg.work_dir),
    )
    digests = dataset_digests(data_uri)
    cache = Path(cfg.work_dir) / "cache" / "data"
    train = load_split(validated_dataset_uri(data_uri), "train", cache_dir=cache)
    held_out = load_split(validated_dataset_uri(data_uri), "evaluation", cache_dir=cache)
    held_out = held_out.select(range(min(section.eval_prompts, len(held_out))))
    ptx = load_split(section.ptx_data, "train", cache_dir=cache) if section.ptx_data else None
    name = f"{STAGE}/{variant}"
    run_context = tracking.stage_run(name, pipeline_run_id, cfg.tracking, cfg.work_dir) if main else None
    with (
        run_context or contextlib.nullcontext() as mlrun,
        staged_output(out_uri) if main else contextlib.nullcontext() as out,
    ):
        if main:
            tracking.log_config(section, f"{STAGE}.")
            mlflow.log_params({"variant": variant, "base_model": policy})
            for split, rows in (("train", train), ("evaluation", held_out)):
                tracking.log_dataset(
                    name=f"beavertails-v/{split}",
                    source_uri=validated_dataset_uri(data_uri),
                    sha256=digests[split],
                    context="training" if split == "train" else "evaluation",
                    rows=len(rows),
                )
        trainer = PPOLagrangianTrainer(
            section,
            models,
            train,
            variant=variant,
            checkpoint_dir=checkpoint_dir(cfg, pipeline_run_id, f"{STAGE}-{variant}"),
            checkpoint_key=checkpoint_key(cfg.work_dir),
            ptx=ptx,
            sink=lambda values, step: mlflow.log_metrics(values, step=step),
        )
        last = trainer.train()
        evaluation = quick_eval(
            trainer,
            held_out,
            batch_size=section.prompt_batch_size * 4,
            ground_truth=cfg.evaluate.ground_truth,
        )
        trainer.save_actor(out)
        if not main:
            return StageResult(stage=STAGE, status="succeeded", metrics=evaluation)
        metrics = evaluation | {"final_lambda": last.get("lambda", 0.0), "final_J_C": last.get("J_C", 0.0)}
        lineage = {
            "stage": STAGE,
            "variant": variant,
            "kind": "policy",
            "pipeline_run_id": pipeline_run_id,
            "data_uri": data_uri,
            "data_sha256": digests,
            "base_model": policy,
            "base_model_sha256": model_digest(policy),
            "reward_model": reward_model,
            "reward_model_sha256": model_digest(reward_model),
            "cost_model": cost_model,
            "cost_model_sha256": model_digest(cost_model),
            "mlflow_run_id": mlrun.info.run_id,
        }
        write_lineage(out, lineage)
        write_json(out / "metrics.json", metrics)
        write_json(out / "history.json", trainer.history)
        result = StageResult(
            stage=STAGE,
            status="succeeded",
            metrics=metrics,
            outputs={"model": out_uri},
            details={"variant": variant, "lineage": lineage},
            mlflow_run_id=mlrun.info.run_id,
            pipeline_run_id=pipeline_run_id,
        )
        write_json(out / RESULT_FILE, asdict(result))
        mlflow.log_metrics(metrics)
        for file in ("metrics.json", "history.json"):
            mlflow.log_artifact(str(out / file), artifact_path=name)
    return result
