"""The one training loop of SFT, reward, cost and guard training, and the step and data-position
accounting PPO shares with it.

A trainer supplies a `Task`: its batch -> loss and its evaluation. Everything else lives here, once:

* **Data position.** `BatchStream` deals this rank's shuffled share of the rows into full batches,
  reshuffled per epoch (DistributedSampler with the run's seed); a `Position` (epoch, batches of
  that epoch consumed) says where a run stands and is what a checkpoint records. A run stopped
  mid-epoch records exactly that, so a longer rerun goes on with the rest of the epoch.
* **Steps.** `max_steps` is checked *before* every micro-batch, so a run resumed at its cap takes
  no further step; the LR schedule's horizon is `total_optimizer_steps`.
* **Non-finite losses** stop the run before the backward pass (`check_finite`), naming the step and
  the checkpoint to resume from.
* **Logging.** `train/*` figures (averaged over ranks) on step 1 and every `log_every_steps`,
  `eval/*` figures after each epoch; `MetricsLog` keeps every record in order and the checkpoint
  carries it, so a resumed run returns the full history, not only what came after the restart.
* **Checkpoints** (`checkpoint.Checkpointer`, one sealed transaction) every `checkpoint_every_steps`
  optimizer steps and after each epoch's evaluation, never between the steps of an accumulation
  window; the state holds the position, the history and the last evaluation, so a run killed after
  its last checkpoint publishes the same figures.

Every rank calls `fit`; ranks draw the same number of batches, so collective operations (ZeRO-3's
parameter gathers, the metric all-reduce) stay in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from safe_rlhf_v.config import ConfigError, TrainConfig
from safe_rlhf_v.train.checkpoint import Checkpointer, engine_fingerprint
from safe_rlhf_v.train.distributed import (
    DistInfo,
    Engine,
    all_reduce_mean,
    barrier,
    build_for_training,
    get_logger,
    init_distributed,
    progress,
    seed_everything,
)

log = get_logger(__name__)
M = TypeVar("M", bound=nn.Module)
MetricsSink = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class Position:
    """Where a run stands in its data: the epoch, and how many of its batches are consumed."""

    epoch: int = 0
    batches_done: int = 0


class BatchStream:
    """This rank's batches of row indices, epoch after epoch (the data position of a run).

    Each rank gets a disjoint shuffled share of the rows (the same order for the same seed and
    epoch); a partial batch is dropped so that every rank runs as many steps.
    """

    def __init__(self, rows: int, batch_size: int, *, seed: int, dist: DistInfo, what: str) -> None:
        self.sampler = DistributedSampler(
            range(rows), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise ConfigError(
                f"{rows} {what} give no full batch of {batch_size} per process on {dist.world_size} "
                "process(es); lower the batch size or add data"
            )

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Every full batch of `epoch`, in order."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        return [
            order[i : i + self.batch_size]
            for i in range(0, self.per_epoch * self.batch_size, self.batch_size)
        ]

    def after(self, epoch: int, batches_done: int) -> Position:
        """The position once `batches_done` batches of `epoch` are consumed (an epoch consumed in full
        is the start of the next)."""
        if batches_done >= self.per_epoch:
            return Position(epoch + 1, 0)
        return Position(epoch, batches_done)


class MetricsLog:
    """Every figure a run emitted, in order, as `{"step": N, **figures}` records.

    Records are kept on every rank (they go into checkpoints); `sink` receives them as they come,
    on rank 0 only.
    """

    def __init__(self, sink: MetricsSink | None, *, is_main: bool) -> None:
        self.records: list[dict[str, Any]] = []
        self._sink = sink if is_main else None

    def emit(self, values: Mapping[str, float], step: int) -> None:
        self.records.append({"step": step, **values})
        if self._sink is not None:
            self._sink(dict(values), step)


def total_optimizer_steps(cfg: TrainConfig, micro_batches_per_epoch: int) -> int:
    """Optimizer steps of a run, the horizon of the LR schedule.

    DeepSpeed counts micro-batches across epochs, so an epoch whose length is not a multiple of
    `gradient_accumulation_steps` carries its remainder into the next one.
    """
    steps = cfg.epochs * micro_batches_per_epoch // cfg.gradient_accumulation_steps
    if steps < 1:
        raise ConfigError(
            f"{micro_batches_per_epoch} micro-batches per epoch × {cfg.epochs} epochs is fewer than "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}: no optimizer step would happen; "
            "lower gradient_accumulation_steps or per_device_batch_size, or add data"
        )
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def reached(step: int, max_steps: int | None) -> bool:
    """The `max_steps` cap is met (None: no cap)."""
    return max_steps is not None and step >= max_steps


def every(step: int, interval: int) -> bool:
    """A cadence of `interval` steps (0: never)."""
    return interval > 0 and step % interval == 0


def log_due(step: int, interval: int) -> bool:
    """Training figures are logged on the first step and every `interval` steps."""
    return step == 1 or every(step, interval)


def check_finite(
    loss: torch.Tensor, *, name: str, where: str, checkpoint_dir: Path, hint: str = "lower learning_rate"
) -> None:
    """Stop before a non-finite loss reaches the weights: the last checkpoint stays good."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{name}: loss is {loss.item()} at {where}; the last good checkpoint is kept under "
            f"{checkpoint_dir}: {hint} and resume"
        )


def trainer_fingerprint(settings: Any) -> dict[str, Any]:
    """A trainer's settings dataclass for the config fingerprint, minus what cannot change the
    trained weights: evaluation batching and remote-code trust (and `train`, which `fit` adds)."""
    fields: dict[str, Any] = asdict(settings)
    for unused in ("train", "eval_batch_size", "trust_remote_code"):
        fields.pop(unused, None)
    return fields


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar figures of an evaluation (guard metrics also hold confusion matrices)."""
    return {key: value for key, value in metrics.items() if isinstance(value, float)}


def format_metrics(metrics: Mapping[str, float]) -> str:
    """`k=v` pairs for a log line."""
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if math.isfinite(v))


class Task(Protocol):
    """What a trainer adds to the loop: its batch -> losses and its evaluation."""

    name: str
    """The engine's name in logs and checkpoints (e.g. "reward")."""

    def losses(self, engine: Engine, indices: list[int]) -> dict[str, torch.Tensor]:
        """The training losses of the rows at `indices`; `"loss"` is optimised, all are logged."""
        ...

    def evaluate(self, engine: Engine) -> dict[str, Any]:
        """Figures on the evaluation data (floats are logged; other values are returned only)."""
        ...


@dataclass
class TrainingResult:
    """The final evaluation and every figure the run emitted (`{"step": N, ...}` records)."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def fit(
    task: Task,
    build: Callable[[], M],
    cfg: TrainConfig,
    *,
    rows: int,
    rows_name: str,
    checkpoint_dir: Path,
    checkpoint_key: bytes,
    settings: Mapping[str, Any],
    sink: MetricsSink | None = None,
    save: Callable[[M, dict[str, torch.Tensor]], None] | None = None,
    evaluate_first: bool = False,
) -> TrainingResult:
    """Train the model `build()` returns on `rows` training rows; returns the final evaluation.

    `build` runs after seeding, under ZeRO-3's partitioning context when configured. Resumes from
    the newest sealed checkpoint under `checkpoint_dir`; `settings` (the trainer's own settings that
    change the result) join the checkpoint's config fingerprint. `evaluate_first` logs an
    evaluation of the untouched model as step 0 of a fresh run. `save(model, weights)` publishes the
    final weights on rank 0 (every rank takes part in gathering them; under ZeRO-3 `model` holds
    only partitions, `weights` the whole).
    """
    dist = init_distributed()
    seed_everything(cfg.seed, dist.rank)
    model = build_for_training(cfg, build)
    stream = BatchStream(rows, cfg.per_device_batch_size, seed=cfg.seed, dist=dist, what=rows_name)
    engine = Engine(model, cfg, total_steps=total_optimizer_steps(cfg, stream.per_epoch), name=task.name)
    checkpoints = Checkpointer(
        checkpoint_dir,
        key=checkpoint_key,
        fingerprint={"trainer": dict(settings), "rows": rows, task.name: engine_fingerprint(engine)},
        keep=cfg.keep_checkpoints,
        allow_changed_config=cfg.resume_with_changed_config,
    )
    run = _Run(task, engine, stream, checkpoints, MetricsLog(sink, is_main=engine.is_main))
    state = checkpoints.restore({task.name: engine})
    if state is None and evaluate_first:
        run.log.emit({f"eval/{k}": v for k, v in scalars(task.evaluate(engine)).items()}, 0)
    elif state is not None:
        run.position = Position(**state["position"])
        run.log.records = state["history"]
        run.metrics = state["metrics"]
    run.epochs()
    metrics = run.metrics if run.metrics is not None else task.evaluate(engine)
    weights = engine.state_dict_for_save()
    if engine.is_main and save is not None:
        save(model, weights)
    barrier()
    return TrainingResult(metrics=metrics, history=run.log.records)


@dataclass
class _Run:
    """One run of the loop: the engine, where it stands in the data, and what it has logged."""

    task: Task
    engine: Engine
    stream: BatchStream
    checkpoints: Checkpointer
    log: MetricsLog
    position: Position = Position()
    metrics: dict[str, Any] | None = None
    """The last evaluation, when it belongs to the current weights (None once they moved on)."""

    def epochs(self) -> None:
        cfg = self.engine.cfg
        for epoch in range(self.position.epoch, cfg.epochs):
            if reached(self.engine.global_step, cfg.max_steps):
                return
            done = self.position.batches_done if epoch == self.position.epoch else 0
            done = self._train_epoch(epoch, done)
            self.metrics = self.task.evaluate(self.engine)
            figures = scalars(self.metrics)
            self.log.emit({f"eval/{k}": v for k, v in figures.items()}, self.engine.global_step)
            log.info("%s epoch %d: %s", self.task.name, epoch + 1, format_metrics(figures))
            self.position = self.stream.after(epoch, done)
            if self.engine.at_step_boundary:  # pending gradients of a partial window cannot be saved
                self._save()

    def _train_epoch(self, epoch: int, done: int) -> int:
        """Train on the batches of `epoch` after the first `done`; returns how many are consumed."""
        engine, cfg = self.engine, self.engine.cfg
        batches = self.stream.epoch_batches(epoch)[done:]
        for indices in progress(
            batches, total=len(batches), desc=f"{self.task.name} epoch {epoch + 1}/{cfg.epochs}"
        ):
            if reached(engine.global_step, cfg.max_steps):
                break
            losses = self.task.losses(engine, indices)
            check_finite(
                losses["loss"],
                name=self.task.name,
                where=f"step {engine.global_step}, epoch {epoch + 1}",
                checkpoint_dir=self.checkpoints.root,
            )
            stepped = engine.backward_and_step(losses["loss"])
            done += 1
            self.metrics = None
            if not stepped:
                continue
            step = engine.global_step
            if log_due(step, cfg.log_every_steps):
                figures = {f"train/{k}": all_reduce_mean(v) for k, v in losses.items()}
                self.log.emit(figures | {"train/lr": engine.lr}, step)
            # The epoch's last batch and the cap are followed by the evaluation and its checkpoint.
            last = done == self.stream.per_epoch or reached(step, cfg.max_steps)
            if every(step, cfg.checkpoint_every_steps) and not last:
                self.position = Position(epoch, done)
                self._save()
        return done

    def _save(self) -> None:
        state = {"position": asdict(self.position), "history": self.log.records, "metrics": self.metrics}
        self.checkpoints.save(self.engine.global_step, {self.task.name: self.engine}, state)
