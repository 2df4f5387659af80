"""Pairwise preference training, shared by the reward model (RM-V) and the cost model (CM-V).

The two differ only in their `Objective` (which response of a pair should score higher, the loss,
the metrics); data loading, evaluation and the training loop (`loop.fit`: resume, checkpoints,
logging) are shared. The evaluation gathers every rank's scores into one table so metrics are
exact whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import datasets
import torch

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.data.collate import PreferenceBatch, PreferenceCollator
from safe_rlhf_v.models.loading import load_processor
from safe_rlhf_v.models.score import ScoreKind, ScoreModel
from safe_rlhf_v.train.batches import PADDING, eval_shards, gather_rows, on_device
from safe_rlhf_v.train.distributed import Engine
from safe_rlhf_v.train.loop import MetricsSink, TrainingResult, fit, trainer_fingerprint


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


@torch.no_grad()
def evaluate(
    engine: Engine, dataset: datasets.Dataset, collator: PreferenceCollator, batch_size: int
) -> EvalTable:
    """Score every evaluation pair (sharded over ranks, gathered back) in eval mode."""
    engine.ds.eval()
    rows: list[torch.Tensor] = []
    for chunk in eval_shards(len(dataset), batch_size, engine):
        valid = torch.tensor([i != PADDING for i in chunk])
        batch = collator([dataset[max(i, 0)] for i in chunk])
        out = engine(**on_device(batch.inputs, engine))
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


def load_score_model(objective: Objective, settings: PreferenceSettings) -> ScoreModel:
    """A fresh score head of the objective's kind on the base model (build it through
    `build_for_training` to partition it as it is built under ZeRO-3)."""
    return ScoreModel.from_base(
        settings.base_model,
        objective.kind,
        freeze_vision_tower=settings.freeze_vision_tower,
        freeze_projector=settings.freeze_projector,
        gradient_checkpointing=False,  # the Engine enables it from TrainConfig
        trust_remote_code=settings.trust_remote_code,
    )


@dataclass(frozen=True)
class PreferenceTask:
    """The loop's view of preference training: a pair batch's loss and the evaluation table."""

    objective: Objective
    collator: PreferenceCollator
    train: datasets.Dataset
    evaluation: datasets.Dataset
    eval_batch_size: int

    @property
    def name(self) -> str:
        return self.objective.kind

    def losses(self, engine: Engine, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.collator([self.train[i] for i in indices])
        scores = engine(**on_device(batch.inputs, engine)).end_scores.float()
        half = len(indices)  # the collator stacks every pair's response_1 rows, then the response_2 rows
        return {"loss": self.objective.loss(scores[:half], scores[half:], batch)}

    def evaluate(self, engine: Engine) -> dict[str, Any]:
        return self.objective.metrics(evaluate(engine, self.evaluation, self.collator, self.eval_batch_size))


def train_preference_model(
    objective: Objective,
    settings: PreferenceSettings,
    *,
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    out_dir: Path | None,
    checkpoint_dir: Path,
    checkpoint_key: bytes,
    sink: MetricsSink | None = None,
) -> TrainingResult:
    """Train, evaluate each epoch, save the model to `out_dir` (rank 0); returns the final metrics
    and the history of logged figures.

    Resumes from the newest sealed checkpoint under `checkpoint_dir` (see `loop.fit`). Every rank
    calls this; `sink(metrics, step)` is called on rank 0 only.
    """
    processor = load_processor(settings.base_model, trust_remote_code=settings.trust_remote_code)
    collator = PreferenceCollator(
        processor, settings.max_length, min_response_tokens=settings.min_response_tokens
    )

    def save(model: ScoreModel, weights: dict[str, torch.Tensor]) -> None:
        if out_dir is not None:
            model.save(out_dir, processor=processor, state_dict=weights)

    return fit(
        PreferenceTask(objective, collator, train, evaluation, settings.eval_batch_size),
        lambda: load_score_model(objective, settings),
        settings.train,
        rows=len(train),
        rows_name="training pairs",
        checkpoint_dir=checkpoint_dir,
        checkpoint_key=checkpoint_key,
        settings=trainer_fingerprint(settings) | {"objective": asdict(objective)},
        sink=sink,
        save=save,
    )
