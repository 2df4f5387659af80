"""Stage `train-guard`: Beaver-Guard-V on the validated data (plus an optional flattened set).

Output: a guard folder (`GuardModel.load`), with `lineage.json`, `metrics.json` (figures and
confusion matrices), `confusion_severity.png` and `result.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from matplotlib.figure import Figure

from safe_rlhf_v import work_dir as layout
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.data.schema import FLAT_COLUMNS
from safe_rlhf_v.data.sources import load_split, to_flat
from safe_rlhf_v.records import StageResult
from safe_rlhf_v.stages.context import open_stage, settings_from
from safe_rlhf_v.tracking import log_config
from safe_rlhf_v.train.guard import GuardSettings, train_guard

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
    section = cfg.train_guard
    base_model = base_model or cfg.base_model
    inputs = {
        "--data": data_uri,
        "base model": base_model,
        "train_guard.extra_data": section.extra_data or "",
    }
    with open_stage(
        STAGE, cfg, out_uri, inputs=inputs, pipeline_run_id=pipeline_run_id, distributed=True
    ) as ctx:
        if ctx.main:
            log_config(section, f"{STAGE}.")
        digests, splits = ctx.load_validated(data_uri)
        train = splits["train"]
        if section.extra_data:
            extra = load_split(section.extra_data, "train", cache_dir=layout.data_cache(ctx.work_dir))
            train = with_extra_rows(train, extra)
        settings = settings_from(
            section, GuardSettings, base_model=ctx.model(base_model), trust_remote_code=cfg.trust_remote_code
        )
        metrics = train_guard(
            settings,
            train=train,
            evaluation=splits["evaluation"],
            out_dir=ctx.out,
            checkpoint_dir=ctx.checkpoint_dir(),
            checkpoint_key=ctx.checkpoint_key(),
            sink=ctx.log_step,
        ).metrics
        figures = []
        if ctx.out is not None:
            for head in ("severity", "safety", "query"):
                if head in metrics["confusion"]:
                    name = f"confusion_{head}.png"
                    confusion_figure(metrics["confusion"][head], f"guard: {head}", ctx.out / name)
                    figures.append(name)
        return ctx.finish(
            {k: float(v) for k, v in metrics.items() if k != "confusion"},
            lineage=ctx.lineage("guard", data_uri=data_uri, digests=digests, base_model=base_model),
            outputs={"model": ctx.out_uri or out_uri},
            details={"confusion": metrics["confusion"]},
            files={"metrics.json": metrics},
            artifacts=["metrics.json", *figures],
        )
