"""Supervised fine-tuning (SFT) of an image-text-to-text policy, and the demo policy's warm start.

A freshly built tiny VLM emits noise, so PPO on it would teach nothing visible. The demo's initial
policy must instead answer like an *unaligned* assistant: fluent, template-like answers, a real share
of them harmful on harmful images, so that the PPO stage can show Safe RLHF-V lowering that share
while a reward-only ablation raises it. `build_demo_policy` gets there by SFT on *both* responses of
every training pair, safe and unsafe alike (`examples_from_pairs`): the policy imitates the mixture
of answer kinds in the data.

The objective is next-token cross-entropy on the response tokens only (`SupervisedCollator` masks
prompt and padding), computed by the model itself from `labels`. Training runs through the same
loop (`loop.fit`: resume, checkpoints, logging) and rank-0 saving as every other trainer;
evaluation reports the loss per response token over the whole evaluation set, summed over ranks
before dividing, so the figure does not depend on batch sizes or the number of processes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForImageTextToText, PreTrainedModel

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.data.collate import IGNORE_INDEX, SupervisedCollator
from safe_rlhf_v.data.sources import load_split, to_flat
from safe_rlhf_v.data.synthetic import corpus
from safe_rlhf_v.errors import ArgumentError, OutputNotEmpty
from safe_rlhf_v.models.loading import load_model, load_processor
from safe_rlhf_v.models.tiny import build_tiny_vlm
from safe_rlhf_v.train.batches import PADDING, eval_shards, on_device
from safe_rlhf_v.train.distributed import Engine, all_reduce_mean, get_logger
from safe_rlhf_v.train.integrity import ephemeral_key
from safe_rlhf_v.train.loop import MetricsSink, TrainingResult, fit

log = get_logger(__name__)
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
        raise ArgumentError(
            f"{name} data set misses column(s) {missing} (has {dataset.column_names}); "
            "turn paired BeaverTails-V rows into SFT rows with examples_from_pairs"
        )
    if len(dataset) == 0:
        raise ArgumentError(f"{name} data set is empty")


def _load_policy(model_dir: str) -> PreTrainedModel:
    return load_model(AutoModelForImageTextToText, model_dir, dtype=torch.float32)


def _forward_loss(engine: Engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (the model shifts the labels itself)."""
    return engine(**on_device(batch, engine), use_cache=False).loss.float()


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
    loss_sum, tokens = 0.0, 0
    for chunk in eval_shards(len(dataset), batch_size, engine):
        batch = collator([dataset[max(i, 0)] for i in chunk])
        batch["labels"][torch.tensor([i == PADDING for i in chunk])] = IGNORE_INDEX
        count = _target_tokens(batch["labels"])
        loss = _forward_loss(engine, batch)
        if count:  # an all-padding batch has no targets (and a NaN mean)
            loss_sum += float(loss) * count
            tokens += count
    engine.ds.train()
    # Sum over ranks, then divide: the ratio of two rank means is the ratio of the sums.
    mean_loss_sum, mean_tokens = all_reduce_mean(loss_sum), all_reduce_mean(float(tokens))
    loss = mean_loss_sum / mean_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "response_tokens": mean_tokens * engine.dist.world_size,
    }


@dataclass(frozen=True)
class SupervisedTask:
    """The loop's view of SFT: a batch's response-token cross-entropy and the held-out loss."""

    collator: SupervisedCollator
    train: datasets.Dataset
    evaluation: datasets.Dataset
    eval_batch_size: int
    name: str = "sft"

    def losses(self, engine: Engine, indices: list[int]) -> dict[str, torch.Tensor]:
        return {"loss": _forward_loss(engine, self.collator([self.train[i] for i in indices]))}

    def evaluate(self, engine: Engine) -> dict[str, Any]:
        return evaluate(engine, self.evaluation, self.collator, self.eval_batch_size)


def supervised_finetune(
    model_dir: str,
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    cfg: TrainConfig,
    *,
    out_dir: Path,
    checkpoint_dir: Path,
    checkpoint_key: bytes,
    max_length: int,
    sink: MetricsSink | None = None,
) -> TrainingResult:
    """Fine-tune the policy at `model_dir` on (image, question, response) rows; returns the final
    evaluation metrics (`loss` per response token, `perplexity`, `response_tokens`) and the history.

    Every rank calls this. A fresh run first evaluates the untouched model (step 0), then each
    epoch ends with an evaluation; `sink(metrics, step)` receives `train/*` and `eval/*` figures on
    rank 0. Resumes from the newest sealed checkpoint under `checkpoint_dir`. Rank 0 writes the
    model (safetensors: transformers 5 writes nothing else), its generation config and the
    processor into `out_dir`, so the folder loads like the one it started from; callers publish it
    atomically.
    """
    _check_columns(train, "train")
    _check_columns(evaluation, "evaluation")
    processor = load_processor(model_dir)

    def save(model: PreTrainedModel, weights: dict[str, torch.Tensor]) -> None:
        model.save_pretrained(out_dir, state_dict=weights)
        processor.save_pretrained(out_dir)

    return fit(
        SupervisedTask(
            SupervisedCollator(processor, max_length), train, evaluation, cfg.per_device_batch_size
        ),
        lambda: _load_policy(model_dir),
        cfg,
        rows=len(train),
        rows_name="training rows",
        checkpoint_dir=checkpoint_dir,
        checkpoint_key=checkpoint_key,
        settings={"model": model_dir, "max_length": max_length},
        sink=sink,
        save=save,
        evaluate_first=True,
    )


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
        raise OutputNotEmpty(f"demo model output {out} already exists and is not an empty directory")
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
            checkpoint_key=ephemeral_key(),  # the staging folder never outlives this process
            max_length=DEMO_MAX_LENGTH,
            sink=sink,
        ).metrics
        model.chmod(0o755)
        os.replace(model, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics
