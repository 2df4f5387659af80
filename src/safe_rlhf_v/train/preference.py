"""Pairwise preference training, shared by the reward model (RM-V) and the cost model (CM-V).

The two differ only in their `Objective` (which response of a pair should score higher, the loss,
the metrics); data loading, the DeepSpeed loop, evaluation, checkpoints and resume are this one
loop. The evaluation gathers every rank's scores into one table so metrics are exact whatever the
number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import datasets
import torch
import torch.distributed as tdist
from torch.utils.data import DistributedSampler
from transformers import AutoProcessor, ProcessorMixin

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.data.collate import PreferenceBatch, PreferenceCollator
from safe_rlhf_v.models.score import ScoreKind, ScoreModel
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


@dataclass(frozen=True)
class EvalTable:
    """Scores and labels of every evaluated pair (N pairs; column 0 = response_1, 1 = response_2)."""

    scores: torch.Tensor  # (N, 2) float
    more_helpful: torch.Tensor  # (N,) long, index of the more helpful response
    safer: torch.Tensor  # (N,) long, index of the safer response
    is_safe: torch.Tensor  # (N, 2) bool
    harmless_rate: torch.Tensor  # (N, 2) long

    def pick(self, index: torch.Tensor) -> torch.Tensor:
        """The score of the response at `index` in each pair."""
        return self.scores.gather(1, index.view(-1, 1)).squeeze(1)


class Objective(Protocol):
    """What makes a preference model a reward or a cost model."""

    kind: ScoreKind

    def loss(self, first: torch.Tensor, second: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
        """Loss from the scores of response_1 (`first`) and response_2 (`second`) of each pair."""
        ...

    def metrics(self, table: EvalTable) -> dict[str, float]:
        """Evaluation figures over the whole table."""
        ...


@dataclass(frozen=True)
class PreferenceSettings:
    """Everything the loop needs besides the data: the model, its optimisation, the batching."""

    base_model: str
    train: TrainConfig
    max_length: int
    eval_batch_size: int
    freeze_vision_tower: bool
    freeze_projector: bool
    min_response_tokens: int
    trust_remote_code: bool = False


def score_stats(prefix: str, scores: torch.Tensor, harmful: torch.Tensor) -> dict[str, float]:
    """Mean and spread of the scores of safe and of harmful responses (flattened)."""
    stats: dict[str, float] = {}
    for name, mask in (("safe", ~harmful), ("harmful", harmful)):
        chosen = scores[mask].double()
        if chosen.numel():
            stats[f"{prefix}_{name}_mean"] = float(chosen.mean())
            stats[f"{prefix}_{name}_std"] = float(chosen.std(unbiased=False))
    return stats


def to_device(batch: PreferenceBatch, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Model inputs on the training device, floating ones (pixel values) in the engine's dtype."""
    inputs = {}
    for key, value in batch.inputs.items():
        value = value.to(device)
        inputs[key] = value.to(dtype) if value.is_floating_point() else value
    return inputs


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    """Consecutive chunks of `size` indices (the last one may be shorter)."""
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int, skip: int) -> list[list[int]]:
    """This rank's micro-batches of an epoch, minus the `skip` already consumed before a restart."""
    sampler.set_epoch(epoch)
    full = [b for b in micro_batches(list(sampler), batch_size) if len(b) == batch_size]
    return full[skip:]


def eval_indices(n: int, rank: int, world: int) -> list[int]:
    """This rank's share of the evaluation rows, padded with -1 so every rank runs as many batches
    (ZeRO-3 gathers parameters collectively: ranks must run the same number of forward passes)."""
    per_rank = math.ceil(n / world)
    mine = list(range(rank, n, world))
    return mine + [-1] * (per_rank - len(mine))


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's (n, k) table stacked in rank order (equal n on every rank: see `eval_indices`)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, local)
    return torch.cat(parts)


@torch.no_grad()
def evaluate(
    engine: Engine, dataset: datasets.Dataset, collator: PreferenceCollator, batch_size: int
) -> EvalTable:
    """Score every evaluation pair (sharded over ranks, gathered back) in eval mode."""
    engine.ds.eval()
    rank, world = engine.dist.rank, engine.dist.world_size
    rows: list[torch.Tensor] = []
    for chunk in micro_batches(eval_indices(len(dataset), rank, world), batch_size):
        valid = torch.tensor([i >= 0 for i in chunk])
        batch = collator([dataset[max(i, 0)] for i in chunk])
        out = engine(**to_device(batch, engine.dist.device, engine.dtype))
        scores = out.end_scores.float().cpu().view(2, -1).T  # (B, 2)
        rows.append(
            torch.cat(
                [
                    scores,
                    batch.more_helpful.view(-1, 1).float(),
                    batch.safer.view(-1, 1).float(),
                    batch.is_safe.float(),
                    batch.harmless_rate.float(),
                    valid.view(-1, 1).float(),
                ],
                dim=1,
            )
        )
    local = torch.cat(rows).to(engine.dist.device) if rows else torch.empty(0, 9, device=engine.dist.device)
    table = gather_rows(local).cpu()
    table = table[table[:, 8] > 0]
    engine.ds.train()
    return EvalTable(
        scores=table[:, 0:2],
        more_helpful=table[:, 2].long(),
        safer=table[:, 3].long(),
        is_safe=table[:, 4:6].bool(),
        harmless_rate=table[:, 6:8].long(),
    )


def load_score_model(
    objective: Objective, settings: PreferenceSettings, ds_config: dict[str, Any]
) -> ScoreModel:
    """A fresh score head of the objective's kind on the base model (partitioned as built under ZeRO-3)."""
    with model_init_context(ds_config):
        return ScoreModel.from_base(
            settings.base_model,
            objective.kind,
            freeze_vision_tower=settings.freeze_vision_tower,
            freeze_projector=settings.freeze_projector,
            gradient_checkpointing=False,  # the Engine enables it from TrainConfig
            trust_remote_code=settings.trust_remote_code,
        )


def train_preference_model(
    objective: Objective,
    settings: PreferenceSettings,
    *,
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    out_dir: Path | None,
    checkpoint_dir: Path,
    sink: MetricsSink | None = None,
) -> dict[str, float]:
    """Train, evaluate each epoch, save the model to `out_dir` (rank 0); returns the final metrics.

    Resumes from the newest valid checkpoint under `checkpoint_dir` when there is one. Every rank
    calls this; `sink(metrics, step)` is called on rank 0 only.
    """
    dist = init_distributed()
    cfg = settings.train
    seed_everything(cfg.seed, dist.rank)
    processor: ProcessorMixin = AutoProcessor.from_pretrained(
        settings.base_model, trust_remote_code=settings.trust_remote_code
    )
    collator = PreferenceCollator(
        processor, settings.max_length, min_response_tokens=settings.min_response_tokens
    )
    ds_config = train_ds_config(cfg, dist.world_size, dist.device.type)
    model = load_score_model(objective, settings, ds_config)
    sampler, per_epoch = epoch_sampler(len(train), cfg, dist, "training pairs")
    engine = Engine(model, cfg, total_steps=total_optimizer_steps(cfg, per_epoch), name=objective.kind)
    state = engine.load_latest(checkpoint_dir) or {"epoch": 0, "micro_batches_done": 0}
    emit = sink if (sink is not None and engine.is_main) else (lambda metrics, step: None)
    metrics: dict[str, float] = {}
    for epoch in range(int(state["epoch"]), cfg.epochs):
        skip = int(state["micro_batches_done"]) if epoch == int(state["epoch"]) else 0
        done = skip
        for indices in progress(
            epoch_batches(sampler, epoch, cfg.per_device_batch_size, skip),
            total=per_epoch - skip,
            desc=f"{objective.kind} epoch {epoch + 1}/{cfg.epochs}",
        ):
            batch = collator([train[i] for i in indices])
            out = engine(**to_device(batch, dist.device, engine.dtype))
            half = len(indices)
            loss = objective.loss(out.end_scores[:half].float(), out.end_scores[half:].float(), batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{objective.kind}: loss is {loss.item()} at step {engine.global_step}; the last good "
                    f"checkpoint is kept under {checkpoint_dir}: lower learning_rate and resume"
                )
            stepped = engine.backward_and_step(loss)
            done += 1
            if not stepped:
                continue
            step = engine.global_step
            if step % cfg.log_every_steps == 0 or step == 1:
                emit({"train/loss": all_reduce_mean(loss), "train/lr": engine.lr}, step)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
            if engine.checkpoint_due(end_of_epoch=False):
                engine.save_checkpoint(
                    checkpoint_dir, client_state={"epoch": epoch, "micro_batches_done": done}
                )
        metrics = objective.metrics(evaluate(engine, evaluation, collator, settings.eval_batch_size))
        emit({f"eval/{k}": v for k, v in metrics.items()}, engine.global_step)
        log.info("%s epoch %d: %s", objective.kind, epoch + 1, format_metrics(metrics))
        finished = cfg.max_steps is not None and engine.global_step >= cfg.max_steps
        position = (
            {"epoch": epoch + 1, "micro_batches_done": 0}
            if done >= per_epoch
            else {"epoch": epoch, "micro_batches_done": done}
        )
        if engine.at_step_boundary:  # gradients still pending cannot be checkpointed
            engine.save_checkpoint(checkpoint_dir, client_state=position)
        if finished:
            break
    if not metrics:  # resumed after the last epoch had already finished
        metrics = objective.metrics(evaluate(engine, evaluation, collator, settings.eval_batch_size))
    weights = engine.state_dict_for_save()
    if engine.is_main and out_dir is not None:
        model.save(out_dir, processor=processor, state_dict=weights)
    barrier()
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """`k=v` pairs for a log line."""
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
