"""Stage `train-guard`: Beaver-Guard-V on the validated data (plus an optional flattened set).

Output: a guard folder (`GuardModel.load`), with `lineage.json`, `metrics.json` (figures and
confusion matrices), `confusion_severity.png` and `result.json`.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import mlflow
from matplotlib.figure import Figure

from safe_rlhf_v import tracking
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.data.schema import FLAT_COLUMNS
from safe_rlhf_v.data.sources import load_split, to_flat
from safe_rlhf_v.stages.common import RESULT_FILE, StageResult, local_model, staged_output, write_json
from safe_rlhf_v.stages.lineage import dataset_digests, model_digest, validated_dataset_uri, write_lineage
from safe_rlhf_v.stages.train_score import checkpoint_dir
from safe_rlhf_v.train.distributed import init_distributed
from safe_rlhf_v.train.guard import GuardSettings, train_guard
from safe_rlhf_v.train.integrity import checkpoint_key

STAGE = "train-guard"


def with_extra_rows(train: datasets.Dataset, extra: datasets.Dataset) -> datasets.Dataset:
    """The paired training split flattened, followed by the extra flattened rows (unrated there)."""
    flat = to_flat(train)
    rows = extra.select_columns(list(FLAT_COLUMNS))
    rows = rows.add_column("harmless_rate", [None] * len(rows)).cast(flat.features)
    return datasets.concatenate_datasets([flat, rows])


def confusion_figure(confusion: dict[str, Any], title: str, path: Path) -> None:
    """A labelled confusion matrix (rows: truth, columns: prediction) as a PNG."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    # A bare Figure renders without pyplot's global state or a display backend.
    fig = Figure(figsize=(1.2 + 0.7 * len(labels), 1.0 + 0.7 * len(labels)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run(
    cfg: PipelineConfig,
    data_uri: str,
    out_uri: str,
    *,
    pipeline_run_id: str | None = None,
    base_model: str | None = None,
) -> StageResult:
    """Train the guard on validate-data's output at `data_uri`; publish it to `out_uri`."""
    dist = init_distributed()
    main = dist.rank == 0
    section = cfg.train_guard
    pipeline_run_id = pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}"
    base_model = base_model or cfg.base_model
    digests = dataset_digests(data_uri)
    cache = Path(cfg.work_dir) / "cache" / "data"
    train = load_split(validated_dataset_uri(data_uri), "train", cache_dir=cache)
    evaluation = load_split(validated_dataset_uri(data_uri), "evaluation", cache_dir=cache)
    if section.extra_data:
        train = with_extra_rows(train, load_split(section.extra_data, "train", cache_dir=cache))
    settings = GuardSettings(
        base_model=local_model(base_model, cfg.work_dir),
        train=section.train,
        max_length=section.max_length,
        eval_batch_size=section.eval_batch_size,
        freeze_vision_tower=section.freeze_vision_tower,
        freeze_projector=section.freeze_projector,
        min_response_tokens=section.min_response_tokens,
        rating_loss_weight=section.rating_loss_weight,
        category_loss_weight=section.category_loss_weight,
        query_loss_weight=section.query_loss_weight,
        max_class_weight=section.max_class_weight,
        trust_remote_code=cfg.trust_remote_code,
    )
    run_context = tracking.stage_run(STAGE, pipeline_run_id, cfg.tracking, cfg.work_dir) if main else None
    outputs = staged_output(out_uri) if main else None
    with run_context or contextlib.nullcontext() as mlrun, outputs or contextlib.nullcontext() as out:
        if main:
            tracking.log_config(section, f"{STAGE}.")
            mlflow.log_param("base_model", base_model)
            for split, rows in (("train", train), ("evaluation", evaluation)):
                tracking.log_dataset(
                    name=f"beavertails-v/{split}",
                    source_uri=validated_dataset_uri(data_uri),
                    sha256=digests[split],
                    context="training" if split == "train" else "evaluation",
                    rows=len(rows),
                )
        metrics = train_guard(
            settings,
            train=train,
            evaluation=evaluation,
            out_dir=out,
            checkpoint_dir=checkpoint_dir(cfg, pipeline_run_id, STAGE),
            checkpoint_key=checkpoint_key(cfg.work_dir),
            sink=lambda values, step: mlflow.log_metrics(values, step=step),
        ).metrics
        scalars = {k: float(v) for k, v in metrics.items() if k != "confusion"}
        if not main:
            return StageResult(stage=STAGE, status="succeeded", metrics=scalars)
        lineage = {
            "stage": STAGE,
            "kind": "guard",
            "pipeline_run_id": pipeline_run_id,
            "data_uri": data_uri,
            "data_sha256": digests,
            "base_model": base_model,
            "base_model_sha256": model_digest(base_model),
            "mlflow_run_id": mlrun.info.run_id,
        }
        write_lineage(out, lineage)
        write_json(out / "metrics.json", metrics)
        figures = []
        for head in ("severity", "safety", "query"):
            if head in metrics["confusion"]:
                path = out / f"confusion_{head}.png"
                confusion_figure(metrics["confusion"][head], f"guard: {head}", path)
                figures.append(path)
        result = StageResult(
            stage=STAGE,
            status="succeeded",
            metrics=scalars,
            outputs={"model": out_uri},
            details={"lineage": lineage, "confusion": metrics["confusion"]},
            mlflow_run_id=mlrun.info.run_id,
            pipeline_run_id=pipeline_run_id,
        )
        write_json(out / RESULT_FILE, asdict(result))
        mlflow.log_metrics(scalars)
        mlflow.log_artifact(str(out / "metrics.json"), artifact_path=STAGE)
        for path in figures:
            mlflow.log_artifact(str(path), artifact_path=STAGE)
    return result
