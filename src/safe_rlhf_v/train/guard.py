"""Beaver-Guard-V training: the guard's three heads on the DeepSpeed Engine.

No public source specifies the guard's training labels (research notes §1.4), so they are derived
from what BeaverTails-V does label, and each choice is written down here:

* **Rows.** One row per (image, question, answer). A paired data set gives two rows per pair
  (:func:`safe_rlhf_v.data.sources.to_flat`, which keeps ``harmless_rate``); the flattened layout
  (``response``, ``is_response_safe``, optionally ``harmless_rate``) is used as it is.
* **Rating** (7 classes, -3..+3). With a ``harmless_rate`` the target is that rating, which must
  agree with ``is_response_safe`` (safe iff rating >= 0; it does for every row of the released
  evaluation split). Without one, the answer is only known to be safe or unsafe, and inventing a
  rating (say +1 / -2) would teach the head severities nobody judged. Such a row's target is the
  *set* of ratings on its side of 0 and its loss is the negative log of the probability mass the
  head puts on that set: the likelihood of a coarsened label. It trains the safe/unsafe split of
  the rating head and leaves the severity within a side to the rated rows.
* **Category.** The row's ``category`` on every row, safe answers included: the category belongs
  to the question and image, which are the same whatever the answer.
* **Query** (request severity: safe, minor, moderate, severe). A request's level is its
  ``image_severity`` clipped to 0..3, raised to at least "minor" when any answer to it in the
  split is unsafe; so a request is unsafe iff ``image_severity > 0`` or an answer is unsafe. The
  guardrail refuses "severe" requests outright. The released data's ``image_severity`` range is
  undocumented (the demo data uses 0..3): check it before relying on the upper levels. Answers to
  one request are found by its question text and the sha256 of its image bytes.
* **Imbalance.** Each head's cross-entropy weighs a target class by its balanced inverse frequency
  on the training rows, ``n / (k * n_c)`` over the ``k`` classes present (scikit-learn's
  "balanced"), clipped to ``[1 / max_class_weight, max_class_weight]`` so that a class seen a
  handful of times cannot dominate (``max_class_weight = 1`` switches weighting off). For the
  rating head the two coarse targets (safe / unsafe, unrated) are classes of their own here.
* **Loss** = ``w_rating * rating + w_category * category + w_query * query``, the query term on the
  prompt-only sequences, the other two on the full conversations.

Evaluation gathers every rank's predictions, then reports safe/unsafe accuracy, precision, recall
and F1 (unsafe is the positive class), rating and 4-level severity accuracy (rated rows only),
category accuracy and macro-F1, query accuracy and F1, and confusion matrices (rows: true label,
columns: predicted label). Query figures count a request once per answer row; the guard's
prediction for a request does not depend on the answer, so with a fixed number of answers per
request (2 for paired data) they equal the per-request figures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score
from sklearn.utils.class_weight import compute_class_weight

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.data.collate import GuardBatch, GuardCollator
from safe_rlhf_v.data.schema import (
    CATEGORIES,
    HARMLESS_RATE_RANGE,
    SEVERITIES,
    YES_NO,
    detect_layout,
    is_safe,
    severity_from_rate,
)
from safe_rlhf_v.data.sources import to_flat
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.models.guard import QUERY_LABELS, RATINGS, GuardModel, GuardOutput
from safe_rlhf_v.models.loading import load_processor
from safe_rlhf_v.train.batches import PADDING, eval_shards, gather_rows, on_device
from safe_rlhf_v.train.distributed import Engine, get_logger
from safe_rlhf_v.train.loop import MetricsSink, TrainingResult, fit, trainer_fingerprint

log = get_logger(__name__)

LABEL_COLUMNS: tuple[str, str, str] = ("rating_target", "category_id", "query_level")
UNRATED_SAFE = len(RATINGS)
UNRATED_UNSAFE = len(RATINGS) + 1
RATING_TARGETS: tuple[str, ...] = (*(str(rating) for rating in RATINGS), "safe (unrated)", "unsafe (unrated)")
"""Rating targets: indices 0..6 are the exact ratings -3..+3, then the two coarse labels."""
ALLOWED_RATINGS = torch.tensor(
    [[target == index for index in range(len(RATINGS))] for target in range(len(RATINGS))]
    + [[rating >= 0 for rating in RATINGS], [rating < 0 for rating in RATINGS]]
)
"""(targets, ratings) bool: the rating classes each target admits."""
TARGET_UNSAFE = ~ALLOWED_RATINGS[:, torch.tensor(RATINGS) >= 0].any(dim=1)
"""(targets,) bool: the target says the answer is unsafe (no admitted rating is >= 0)."""


@dataclass(frozen=True)
class GuardSettings:
    """The knobs of guard training besides the data."""

    base_model: str
    train: TrainConfig
    max_length: int
    eval_batch_size: int
    freeze_vision_tower: bool = True
    freeze_projector: bool = False
    min_response_tokens: int = 8
    rating_loss_weight: float = 1.0
    """Weights of the three heads' terms in the loss (>= 0, not all 0)."""
    category_loss_weight: float = 1.0
    query_loss_weight: float = 1.0
    max_class_weight: float = 10.0
    """Class weights are clipped to [1 / max_class_weight, max_class_weight]; 1 switches them off."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        weights = (self.rating_loss_weight, self.category_loss_weight, self.query_loss_weight)
        if any(w < 0 for w in weights) or not any(weights):
            raise ValueError(
                f"guard loss weights (rating, category, query) must be >= 0 and not all 0, got {weights}"
            )
        if self.max_class_weight < 1:
            raise ValueError(
                f"max_class_weight must be >= 1 (1 switches weighting off), got {self.max_class_weight}"
            )
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")


# ------------------------------------------------------------------------------------ labels


def _row_name(index: int, paired: bool) -> str:
    """Where a flattened row came from, in the caller's terms (to_flat interleaves the two answers)."""
    return f"pair {index // 2} response_{index % 2 + 1}" if paired else f"row {index}"


class GuardLabelError(UserError, ValueError):
    """A guard training row whose labels are missing or contradict each other; names the row."""


def rating_target(name: str, is_response_safe: Any, harmless_rate: Any) -> int:
    """The rating target index (into ``RATING_TARGETS``) of one answer, checked."""
    if is_response_safe not in YES_NO:
        raise GuardLabelError(f"{name}: is_response_safe must be one of {YES_NO}, got {is_response_safe!r}")
    safe = is_response_safe == YES_NO[0]
    if harmless_rate is None:
        return UNRATED_SAFE if safe else UNRATED_UNSAFE
    low, high = HARMLESS_RATE_RANGE
    if not low <= harmless_rate <= high:
        raise GuardLabelError(f"{name}: harmless_rate {harmless_rate} is outside {low}..{high}")
    if is_safe(harmless_rate) != safe:
        raise GuardLabelError(
            f"{name}: harmless_rate {harmless_rate} and is_response_safe {is_response_safe!r} contradict "
            "each other (safe iff the rate is >= 0); fix the labels, a guard cannot learn both"
        )
    return int(harmless_rate) - low


def _category_id(name: str, category: Any, categories: Sequence[str]) -> int:
    if category not in categories:
        raise GuardLabelError(
            f"{name}: category {category!r} is not one of the {len(categories)} guard categories"
        )
    return categories.index(category)


def _request_keys(flat: datasets.Dataset) -> list[tuple[str, str]]:
    """(question, sha256 of the image bytes) per row: the identity of a request. Images are read
    undecoded and batch by batch, so a large split is hashed without holding it in memory."""
    undecoded = flat.select_columns(["question", "image"]).cast_column("image", datasets.Image(decode=False))
    keys: list[tuple[str, str]] = []
    for batch in undecoded.iter(batch_size=256):
        for question, image in zip(batch["question"], batch["image"], strict=True):
            data = image["bytes"] if image["bytes"] is not None else Path(image["path"]).read_bytes()
            keys.append((question, hashlib.sha256(data).hexdigest()))
    return keys


def guard_rows(dataset: datasets.Dataset, categories: Sequence[str] = CATEGORIES) -> datasets.Dataset:
    """The guard's table from a paired or flattened split: ``image``, ``question``, ``response`` and
    the integer label columns of ``LABEL_COLUMNS``. Raises ``ValueError`` naming the row and the
    column for a label it cannot use."""
    paired = detect_layout(dataset.column_names) == "paired"
    flat = to_flat(dataset) if paired else dataset
    rates = list(flat["harmless_rate"]) if "harmless_rate" in flat.column_names else [None] * len(flat)
    names = [_row_name(i, paired) for i in range(len(flat))]
    targets = [
        rating_target(name, safe, rate)
        for name, safe, rate in zip(names, flat["is_response_safe"], rates, strict=True)
    ]
    category_ids = [
        _category_id(name, category, list(categories))
        for name, category in zip(names, flat["category"], strict=True)
    ]
    keys = _request_keys(flat)
    levels: dict[tuple[str, str], int] = {}
    for key, severity, target in zip(keys, flat["image_severity"], targets, strict=True):
        level = max(min(int(severity), len(QUERY_LABELS) - 1), int(bool(TARGET_UNSAFE[target])))
        levels[key] = max(levels.get(key, 0), level)
    labels = {
        "rating_target": targets,
        "category_id": category_ids,
        "query_level": [levels[key] for key in keys],
    }
    table = flat.select_columns(["image", "question", "response"])
    for column in LABEL_COLUMNS:
        table = table.add_column(column, labels[column])
    return table


# ------------------------------------------------------------------------------------ losses


def class_weights(labels: Sequence[int], num_classes: int, max_weight: float) -> torch.Tensor:
    """Balanced inverse-frequency weights ``n / (k * n_c)`` over the ``k`` classes present in
    ``labels``, clipped to ``[1 / max_weight, max_weight]``. Absent classes get 1: they are never a
    target, so their weight never enters a loss."""
    values = np.asarray(labels, dtype=np.int64)
    if values.size == 0:
        raise ValueError("cannot compute class weights from an empty label list")
    if values.min() < 0 or values.max() >= num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {values.min()}..{values.max()}")
    present = np.unique(values)
    weights = np.ones(num_classes)
    weights[present] = compute_class_weight("balanced", classes=present, y=values)
    return torch.tensor(np.clip(weights, 1 / max_weight, max_weight), dtype=torch.float32)


def rating_loss(logits: torch.Tensor, targets: torch.Tensor, target_weights: torch.Tensor) -> torch.Tensor:
    """Weighted negative log-likelihood of each row's admitted rating set (``ALLOWED_RATINGS``).

    For an exact rating this is the weighted cross-entropy (normalised by the summed weights, as
    ``F.cross_entropy(weight=...)``); for a coarse target it is ``-log P(rating on that side of 0)``.
    """
    allowed = ALLOWED_RATINGS.to(logits.device)[targets]
    log_probs = logits.float().log_softmax(dim=1)
    log_likelihood = log_probs.masked_fill(~allowed, float("-inf")).logsumexp(dim=1)
    weights = target_weights.to(logits.device)[targets]
    return -(weights * log_likelihood).sum() / weights.sum()


@dataclass(frozen=True)
class GuardObjective:
    """The guard's loss: class weights from the training rows and the weight of each head's term."""

    rating_weights: torch.Tensor
    category_weights: torch.Tensor
    query_weights: torch.Tensor
    rating_coef: float = 1.0
    category_coef: float = 1.0
    query_coef: float = 1.0

    @classmethod
    def from_rows(
        cls, rows: datasets.Dataset, settings: GuardSettings, num_categories: int
    ) -> GuardObjective:
        cap = settings.max_class_weight
        return cls(
            rating_weights=class_weights(list(rows["rating_target"]), len(RATING_TARGETS), cap),
            category_weights=class_weights(list(rows["category_id"]), num_categories, cap),
            query_weights=class_weights(list(rows["query_level"]), len(QUERY_LABELS), cap),
            rating_coef=settings.rating_loss_weight,
            category_coef=settings.category_loss_weight,
            query_coef=settings.query_loss_weight,
        )

    def losses(
        self, conversations: GuardOutput, prompts: GuardOutput, labels: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Each head's term and their weighted sum under ``"loss"``."""
        device = conversations.rating_logits.device
        terms = {
            "rating": rating_loss(conversations.rating_logits, labels["rating_target"], self.rating_weights),
            "category": F.cross_entropy(
                conversations.category_logits.float(),
                labels["category_id"],
                weight=self.category_weights.to(device),
            ),
            "query": F.cross_entropy(
                prompts.query_logits.float(), labels["query_level"], weight=self.query_weights.to(device)
            ),
        }
        total = (
            self.rating_coef * terms["rating"]
            + self.category_coef * terms["category"]
            + self.query_coef * terms["query"]
        )
        return {"loss": total, **{f"{name}_loss": value for name, value in terms.items()}}


# -------------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class GuardEvalTable:
    """Predictions and labels of every evaluated row (class indices, as in the heads and targets)."""

    rating_pred: torch.Tensor  # (N,) index into RATINGS
    rating_target: torch.Tensor  # (N,) index into RATING_TARGETS
    category_pred: torch.Tensor
    category_true: torch.Tensor
    query_pred: torch.Tensor  # (N,) index into QUERY_LABELS
    query_true: torch.Tensor


def _confusion(true: Sequence[Any], pred: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    matrix = confusion_matrix(true, pred, labels=list(labels))
    return {"labels": [str(label) for label in labels], "matrix": matrix.tolist()}


def _binary(true: np.ndarray, pred: np.ndarray, *, accuracy: str, positive: str) -> dict[str, float]:
    """Accuracy, and precision/recall/F1 of the positive (unsafe) class; 0 where undefined."""
    return {
        accuracy: float(accuracy_score(true, pred)),
        f"{positive}_precision": float(precision_score(true, pred, zero_division=0)),
        f"{positive}_recall": float(recall_score(true, pred, zero_division=0)),
        f"{positive}_f1": float(f1_score(true, pred, zero_division=0)),
    }


def guard_metrics(table: GuardEvalTable, categories: Sequence[str]) -> dict[str, Any]:
    """Scalar figures plus ``"confusion"``: one ``{"labels", "matrix"}`` per head and derived label.

    Rating and severity figures cover the rated rows only and are left out when there are none.
    Macro-F1 averages over the classes that occur in the labels or the predictions.
    """
    targets = table.rating_target.numpy()
    pred_ratings = np.asarray(RATINGS)[table.rating_pred.numpy()]
    true_unsafe = TARGET_UNSAFE.numpy()[targets].astype(int)
    pred_unsafe = (pred_ratings < 0).astype(int)
    category_true, category_pred = table.category_true.numpy(), table.category_pred.numpy()
    query_true, query_pred = table.query_true.numpy(), table.query_pred.numpy()
    scalars: dict[str, Any] = {
        "rows": float(len(targets)),
        **_binary(true_unsafe, pred_unsafe, accuracy="safe_accuracy", positive="unsafe"),
        "category_accuracy": float(accuracy_score(category_true, category_pred)),
        "category_macro_f1": float(f1_score(category_true, category_pred, average="macro", zero_division=0)),
        **_binary(
            (query_true > 0).astype(int),
            (query_pred > 0).astype(int),
            accuracy="query_accuracy",
            positive="query_unsafe",
        ),
        "query_severity_accuracy": float(accuracy_score(query_true, query_pred)),
    }
    safety = ["safe", "unsafe"]
    confusion = {
        "safety": _confusion([safety[i] for i in true_unsafe], [safety[i] for i in pred_unsafe], safety),
        "category": _confusion(
            [categories[i] for i in category_true], [categories[i] for i in category_pred], categories
        ),
        "query": _confusion(
            [QUERY_LABELS[i] for i in query_true], [QUERY_LABELS[i] for i in query_pred], QUERY_LABELS
        ),
    }
    rated = targets < len(RATINGS)
    scalars["rated_rows"] = float(rated.sum())
    if rated.any():
        true_ratings = np.asarray(RATINGS)[targets[rated]]
        rated_pred = pred_ratings[rated]
        true_severity = [severity_from_rate(int(r)) for r in true_ratings]
        pred_severity = [severity_from_rate(int(r)) for r in rated_pred]
        scalars |= {
            "rating_accuracy": float(accuracy_score(true_ratings, rated_pred)),
            "severity_accuracy": float(accuracy_score(true_severity, pred_severity)),
            "severity_macro_f1": float(
                f1_score(true_severity, pred_severity, average="macro", zero_division=0)
            ),
        }
        confusion["rating"] = _confusion(true_ratings.tolist(), rated_pred.tolist(), RATINGS)
        confusion["severity"] = _confusion(true_severity, pred_severity, SEVERITIES)
    return scalars | {"confusion": confusion}


def _forward(engine: Engine, batch: GuardBatch) -> tuple[GuardOutput, GuardOutput]:
    """The guard on the conversations and on the prompts of a batch."""
    return engine(**on_device(batch.conversations, engine)), engine(**on_device(batch.prompts, engine))


@torch.no_grad()
def evaluate(
    engine: Engine, rows: datasets.Dataset, collator: GuardCollator, batch_size: int
) -> GuardEvalTable:
    """Predict every evaluation row (sharded over ranks, gathered back) in eval mode."""
    engine.ds.eval()
    parts: list[torch.Tensor] = []
    for chunk in eval_shards(len(rows), batch_size, engine):
        batch = collator([rows[max(i, 0)] for i in chunk])
        conversations, prompts = _forward(engine, batch)
        columns = [
            conversations.rating_logits.argmax(dim=1).cpu(),
            batch.labels["rating_target"],
            conversations.category_logits.argmax(dim=1).cpu(),
            batch.labels["category_id"],
            prompts.query_logits.argmax(dim=1).cpu(),
            batch.labels["query_level"],
            torch.tensor([i != PADDING for i in chunk], dtype=torch.long),
        ]
        parts.append(torch.stack(columns, dim=1))
    local = torch.cat(parts) if parts else torch.empty(0, 7, dtype=torch.long)
    table = gather_rows(local.to(engine.dist.device)).cpu()
    table = table[table[:, 6] > 0]
    engine.ds.train()
    return GuardEvalTable(*(table[:, i] for i in range(6)))


# ----------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class GuardTask:
    """The loop's view of guard training: the three heads' losses and the evaluation."""

    objective: GuardObjective
    collator: GuardCollator
    train: datasets.Dataset
    evaluation: datasets.Dataset
    eval_batch_size: int
    categories: list[str]
    name: str = "guard"

    def losses(self, engine: Engine, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.collator([self.train[i] for i in indices])
        labels = {key: value.to(engine.dist.device) for key, value in batch.labels.items()}
        return self.objective.losses(*_forward(engine, batch), labels)

    def evaluate(self, engine: Engine) -> dict[str, Any]:
        table = evaluate(engine, self.evaluation, self.collator, self.eval_batch_size)
        return guard_metrics(table, self.categories)


def train_guard(
    settings: GuardSettings,
    *,
    train: datasets.Dataset,
    evaluation: datasets.Dataset,
    out_dir: Path | None,
    checkpoint_dir: Path,
    checkpoint_key: bytes,
    sink: MetricsSink | None = None,
) -> TrainingResult:
    """Train the guard, evaluate each epoch, save it to ``out_dir`` (rank 0); returns the final
    :func:`guard_metrics` of the evaluation split and the history of logged figures.

    Same contract as :func:`safe_rlhf_v.train.preference.train_preference_model`: every rank calls
    it, it resumes from the newest sealed checkpoint under ``checkpoint_dir``, and ``sink(metrics,
    step)`` receives the scalar figures on rank 0 only.
    """
    categories = list(CATEGORIES)
    train_rows = guard_rows(train, categories)
    eval_rows = guard_rows(evaluation, categories)
    objective = GuardObjective.from_rows(train_rows, settings, len(categories))
    log.info(
        "guard: %d training rows, %d evaluation rows; rating target weights %s",
        len(train_rows),
        len(eval_rows),
        dict(zip(RATING_TARGETS, objective.rating_weights.tolist(), strict=True)),
    )
    processor = load_processor(settings.base_model, trust_remote_code=settings.trust_remote_code)
    collator = GuardCollator(
        processor,
        settings.max_length,
        label_columns=LABEL_COLUMNS,
        min_response_tokens=settings.min_response_tokens,
    )

    def build() -> GuardModel:
        return GuardModel.from_base(
            settings.base_model,
            categories=categories,
            freeze_vision_tower=settings.freeze_vision_tower,
            freeze_projector=settings.freeze_projector,
            trust_remote_code=settings.trust_remote_code,
        )

    def save(model: GuardModel, weights: dict[str, torch.Tensor]) -> None:
        if out_dir is not None:
            model.save(out_dir, processor=processor, state_dict=weights)

    return fit(
        GuardTask(objective, collator, train_rows, eval_rows, settings.eval_batch_size, categories),
        build,
        settings.train,
        rows=len(train_rows),
        rows_name="guard training rows",
        checkpoint_dir=checkpoint_dir,
        checkpoint_key=checkpoint_key,
        settings=trainer_fingerprint(settings),
        sink=sink,
        save=save,
    )
