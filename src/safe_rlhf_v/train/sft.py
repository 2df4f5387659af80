"""Supervised fine-tuning (SFT) of an image-text-to-text policy, and the demo policy's warm start.

A freshly built tiny VLM emits noise, so PPO on it would teach nothing visible. The demo's initial
policy must instead answer like an *unaligned* assistant: fluent, template-like answers, a real share
of them harmful on harmful images, so that the PPO stage can show Safe RLHF-V lowering that share
while a reward-only ablation raises it. `build_demo_policy` gets there by SFT on *both* responses of
every training pair, safe and unsafe alike (`examples_from_pairs`): the policy imitates the mixture
of answer kinds in the data.

The objective is next-token cross-entropy on the response tokens only (`SupervisedCollator` masks
prompt and padding), computed by the model itself from `labels`. Training runs through the same
DeepSpeed `Engine`, resume contract and rank-0 saving as every other trainer; evaluation reports the
loss per response token over the whole evaluation set, summed over ranks before dividing, so the
figure does not depend on batch sizes or the number of processes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import BatchSampler, DistributedSampler
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.data.collate import IGNORE_INDEX, SupervisedCollator
from safe_rlhf_v.data.sources import load_split, to_flat
from safe_rlhf_v.data.synthetic import corpus
from safe_rlhf_v.models.tiny import build_tiny_vlm
from safe_rlhf_v.train.distributed import (
    Engine,
    all_reduce_mean,
    barrier,
    epoch_sampler,
    get_logger,
    init_distributed,
    model_init_context,
    progress,
    seed_everything,
    total_optimizer_steps,
    train_ds_config,
)

log = get_logger(__name__)
MetricsSink = Callable[[dict[str, float], int], None]
SFT_COLUMNS = ("image", "question", "response")

# The demo warm start. 600 pairs give 1200 examples, 75 steps of 16 per epoch. A from-scratch model
# this small tolerates a high learning rate; the held-out loss keeps falling until about the fifth
# epoch (~0.12 nats per response token), when answers copy the question's object and follow the
# data's templates. About 10 s of single-core CPU time per epoch.
DEMO_SFT_EPOCHS = 5
DEMO_MAX_LENGTH = 256
_DEMO_SFT = {
    "per_device_batch_size": 16,
    "learning_rate": 4e-3,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.05,
    "log_every_steps": 25,
}


def examples_from_pairs(dataset: datasets.Dataset) -> datasets.Dataset:
    """One SFT row (image, question, response) per response of each paired BeaverTails-V row.

    Both responses are kept whatever their safety or helpfulness: the demo policy must imitate the
    unaligned mixture, harmful compliance included. The two responses of a pair stay adjacent.
    """
    return to_flat(dataset).select_columns(list(SFT_COLUMNS))


def _check_columns(dataset: datasets.Dataset, name: str) -> None:
    missing = [column for column in SFT_COLUMNS if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{name} data set misses column(s) {missing} (has {dataset.column_names}); "
            "turn paired BeaverTails-V rows into SFT rows with examples_from_pairs"
        )
    if len(dataset) == 0:
        raise ValueError(f"{name} data set is empty")


def _load_policy(model_dir: str, ds_config: dict[str, Any]) -> PreTrainedModel:
    with model_init_context(ds_config):
        return AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True
        )


def _to_device(batch: dict[str, torch.Tensor], engine: Engine) -> dict[str, torch.Tensor]:
    """Move a batch to the engine's device; floating tensors (pixel values) take its dtype."""
    moved = {}
    for key, value in batch.items():
        value = value.to(engine.dist.device)
        moved[key] = value.to(engine.dtype) if value.is_floating_point() else value
    return moved


def _forward_loss(engine: Engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (the model shifts the labels itself)."""
    return engine(**_to_device(batch, engine), use_cache=False).loss.float()


def _target_tokens(labels: torch.Tensor) -> int:
    # labels[:, 0] is never a target: no logit predicts the first token.
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(
    engine: Engine, dataset: datasets.Dataset, collator: SupervisedCollator, batch_size: int
) -> dict[str, float]:
    """Loss per response token (and its perplexity) over every evaluation row, in eval mode.

    Rows are sharded over ranks; a rank with fewer rows runs padding rows whose labels are all
    ignored, because under ZeRO-3 every rank must run the same number of forward passes.
    """
    engine.ds.eval()
    rank, world = engine.dist.rank, engine.dist.world_size
    per_rank = math.ceil(len(dataset) / world)
    mine = list(range(rank, len(dataset), world))
    mine += [-1] * (per_rank - len(mine))
    loss_sum, tokens = 0.0, 0
    for start in range(0, per_rank, batch_size):
        chunk = mine[start : start + batch_size]
        batch = collator([dataset[max(i, 0)] for i in chunk])
        batch["labels"][torch.tensor([i < 0 for i in chunk])] = IGNORE_INDEX
        count = _target_tokens(batch["labels"])
        loss = _forward_loss(engine, batch)
        if count:  # an all-padding batch has no targets (and a NaN mean)
            loss_sum += float(loss) * count
            tokens += count
    engine.ds.train()
    # Sum over ranks, then divide: the ratio of two rank means is the ratio of the sums.
    mean_loss_sum, mean_tokens = all_reduce_mean(loss_sum), all_reduce_mean(float(tokens))
    loss = mean_loss_sum / mean_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "response_tokens": mean_tokens * world}


def _reached_max_steps(engine: Engine) -> bool:
    return engine.cfg.max_steps is not None and engine.global_step >= engine.cfg.max_steps


def _train_epoch(
    engine: Engine,
    train: datasets.Dataset,
    collator: SupervisedCollator,
    sampler: DistributedSampler,
    epoch: int,
    skip: int,
    checkpoint_dir: Path,
    emit: MetricsSink,
) -> int:
    """Train on this rank's micro-batches of `epoch` after the `skip` consumed before a restart.

    Returns how many micro-batches of the epoch are consumed; fewer than all when `max_steps` hit.
    """
    cfg = engine.cfg
    sampler.set_epoch(epoch)
    batches = list(BatchSampler(sampler, cfg.per_device_batch_size, drop_last=True))
    done = skip
    for indices in progress(batches[skip:], desc=f"sft epoch {epoch + 1}/{cfg.epochs}"):
        loss = _forward_loss(engine, collator([train[i] for i in indices]))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"sft: loss is {loss.item()} at step {engine.global_step}, epoch {epoch + 1}; the last good "
                f"checkpoint is kept under {checkpoint_dir}: lower learning_rate and resume"
            )
        stepped = engine.backward_and_step(loss)
        done += 1
        if not stepped:
            continue
        step = engine.global_step
        if step % cfg.log_every_steps == 0 or step == 1:
            emit({"train/loss": all_reduce_mean(loss), "train/lr": engine.lr}, step)
        if _reached_max_steps(engine):
            break
        if engine.checkpoint_due(end_of_epoch=False):
            engine.save_checkpoint(checkpoint_dir, client_state={"epoch": epoch, "micro_batches_done": done})
    return done


def supervised_finetune(
    model_dir: str,
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    cfg: TrainConfig,
    *,
    out_dir: Path,
    checkpoint_dir: Path,
    max_length: int,
    sink: MetricsSink | None = None,
) -> dict[str, float]:
    """Fine-tune the policy at `model_dir` on (image, question, response) rows; returns the final
    evaluation metrics (`loss` per response token, `perplexity`, `response_tokens`).

    Every rank calls this. A fresh run first evaluates the untouched model (step 0), then each
    epoch ends with an evaluation; `sink(metrics, step)` receives `train/*` and `eval/*` figures on
    rank 0. Resumes from the newest valid checkpoint under `checkpoint_dir`. Rank 0 writes the
    model (safetensors: transformers 5 writes nothing else), its generation config and the
    processor into `out_dir`, so the folder loads like the one it started from; callers publish it
    atomically.
    """
    _check_columns(train, "train")
    _check_columns(evaluation, "evaluation")
    dist = init_distributed()
    seed_everything(cfg.seed, dist.rank)
    processor = AutoProcessor.from_pretrained(model_dir)
    collator = SupervisedCollator(processor, max_length)
    model = _load_policy(model_dir, train_ds_config(cfg, dist.world_size, dist.device.type))
    sampler, per_epoch = epoch_sampler(len(train), cfg, dist, "training rows")
    engine = Engine(model, cfg, total_steps=total_optimizer_steps(cfg, per_epoch), name="sft")
    emit = sink if (sink is not None and engine.is_main) else (lambda metrics, step: None)
    state = engine.load_latest(checkpoint_dir)
    if state is None:
        state = {"epoch": 0, "micro_batches_done": 0}
        emit(_prefixed(evaluate(engine, evaluation, collator, cfg.per_device_batch_size)), 0)
    metrics: dict[str, float] = {}
    for epoch in range(int(state["epoch"]), cfg.epochs):
        if _reached_max_steps(engine):
            break
        skip = int(state["micro_batches_done"]) if epoch == int(state["epoch"]) else 0
        done = _train_epoch(engine, train, collator, sampler, epoch, skip, checkpoint_dir, emit)
        metrics = evaluate(engine, evaluation, collator, cfg.per_device_batch_size)
        emit(_prefixed(metrics), engine.global_step)
        log.info("sft epoch %d: eval loss %.4f per response token", epoch + 1, metrics["loss"])
        if engine.at_step_boundary:  # pending gradients cannot be checkpointed
            # max_steps may have stopped the epoch early: record where, so a longer rerun goes on.
            position = {"epoch": epoch, "micro_batches_done": done}
            if done == per_epoch:
                position = {"epoch": epoch + 1, "micro_batches_done": 0}
            engine.save_checkpoint(checkpoint_dir, client_state=position)
    if not metrics:  # resumed after training had already finished
        metrics = evaluate(engine, evaluation, collator, cfg.per_device_batch_size)
    weights = engine.state_dict_for_save()
    if engine.is_main:
        engine.module.save_pretrained(out_dir, state_dict=weights)
        processor.save_pretrained(out_dir)
    barrier()
    return metrics


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"eval/{key}": value for key, value in metrics.items()}


def demo_sft_config(epochs: int = DEMO_SFT_EPOCHS, seed: int = 0) -> TrainConfig:
    """The warm-start settings of the demo policy (validated like any other TrainConfig)."""
    return TrainConfig(epochs=epochs, seed=seed, **_DEMO_SFT)


def build_demo_policy(
    data: str,
    out: Path,
    *,
    seed: int = 0,
    epochs: int | None = None,
    family: str = "llava",
    sink: MetricsSink | None = None,
) -> dict[str, float]:
    """Build the tiny VLM (tokenizer trained on the data's texts), warm-start it by SFT on both
    responses of every train pair, evaluate on the evaluation split, and publish it at `out`.

    Single process. Everything is built in a temporary sibling of `out` and renamed into place, so
    an interrupted run never leaves a folder that looks like a model. `out` may exist only if empty.
    Returns the final evaluation metrics of :func:`supervised_finetune`.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"demo model output {out} already exists and is not an empty directory")
    train = load_split(data, "train")
    evaluation = load_split(data, "evaluation")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # Only text columns: the tokenizer needs no decoded images.
        texts = corpus(train.select_columns(["question", "response_1", "response_2"]).to_list())
        base = build_tiny_vlm(staging / "base", texts, family=family, seed=seed)
        model = staging / "model"
        metrics = supervised_finetune(
            str(base),
            examples_from_pairs(train),
            examples_from_pairs(evaluation),
            demo_sft_config(DEMO_SFT_EPOCHS if epochs is None else epochs, seed),
            out_dir=model,
            checkpoint_dir=staging / "checkpoints",
            max_length=DEMO_MAX_LENGTH,
            sink=sink,
        )
        model.chmod(0o755)
        os.replace(model, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics
