"""Stage `validate-data`: check the BeaverTails-V data with great-expectations, then publish it.

Outputs (a folder, local or `s3://`):

    dataset/            the validated data (`save_to_disk` DatasetDict: train, evaluation); only on success
    validation.json     every expectation's outcome, the GX results, leakage between splits
    statistics.json     per split: rows, categories, safe ratio, preference disagreements
    data_docs/          GX HTML data docs (index.html)
    report.html         a self-contained summary page for the Kubeflow UI
    result.json         the stage result (also returned)

Split names are canonical downstream (`train`, `evaluation`) whatever the source calls them, so
later stages never need the data section of the config to find their data.
"""

from __future__ import annotations

import logging

import datasets

from safe_rlhf_v import tracking
from safe_rlhf_v import work_dir as layout
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.data.validation import ValidationReport, validate_splits
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.lineage import arrow_sha256
from safe_rlhf_v.records import StageResult
from safe_rlhf_v.stages import html
from safe_rlhf_v.stages.context import open_stage

STAGE = "validate-data"
CANONICAL_SPLITS = ("train", "evaluation")
log = logging.getLogger(__name__)


class DataValidationError(UserError, RuntimeError):
    """The data failed validation; the message lists each failed expectation with counts."""


def _load(cfg: PipelineConfig, data_uri: str) -> dict[str, datasets.Dataset]:
    cache = layout.data_cache(cfg.work_dir)
    sources = dict(zip(CANONICAL_SPLITS, (cfg.data.train_split, cfg.data.eval_split), strict=True))
    splits = {}
    for canonical, source_split in sources.items():
        log.info("loading split %r of %s", source_split, data_uri)
        splits[canonical] = load_split(
            data_uri,
            source_split,
            configs=list(cfg.data.configs),
            revision=cfg.data.revision,
            cache_dir=cache,
        )
    return splits


def _metrics(report: ValidationReport) -> dict[str, float]:
    metrics: dict[str, float] = {
        "failed_expectations": float(sum(not outcome.success for outcome in report.outcomes)),
        "leaked_images": float(report.leakage.get("count", 0)),
    }
    for split, stats in report.statistics.items():
        for key in ("rows", "safe_ratio", "harmful_image_share"):
            if isinstance(stats.get(key), int | float):
                metrics[f"{split}.{key}"] = float(stats[key])
    return metrics


def render_report(report: ValidationReport, data_uri: str) -> str:
    """The summary page: one row per expectation, then per-split statistics and leakage."""
    outcomes = html.table(
        ["split", "expectation", "column", "result", "unexpected", "of", "examples"],
        [
            [
                o.split,
                o.description,
                o.column or "",
                html.status(o.success),
                o.unexpected_count,
                o.element_count,
                ", ".join(map(str, o.examples[:5])),
            ]
            for o in report.outcomes
        ],
    )
    stats = html.table(
        ["split", "statistic", "value"],
        [[split, key, value] for split, values in report.statistics.items() for key, value in values.items()],
    )
    leakage = html.table(["images shared by train and evaluation"], [[report.leakage.get("count", 0)]])
    verdict = html.status(report.success)
    return html.page(
        f"Data validation of {data_uri}",
        [("Verdict", verdict), ("Expectations", outcomes), ("Statistics", stats), ("Leakage", leakage)],
    )


def run(
    cfg: PipelineConfig,
    out_uri: str,
    *,
    data_uri: str | None = None,
    pipeline_run_id: str | None = None,
) -> StageResult:
    """Validate the data at `data_uri` (default: the config's) and publish it to `out_uri`.

    Raises `DataValidationError` after writing the reports (but no `dataset/`) when an expectation
    fails, so the task fails and nothing downstream can consume unvalidated data.
    """
    data_uri = data_uri or cfg.data.uri
    with open_stage(STAGE, cfg, out_uri, inputs={"--data": data_uri}, pipeline_run_id=pipeline_run_id) as ctx:
        tracking.log_config(cfg.data, "data.")
        tracking.log_config(cfg.validate_data, "validate_data.")
        splits = _load(cfg, data_uri)
        assert ctx.out is not None and ctx.out_uri is not None  # validate-data is a single-process stage
        out, out_uri = ctx.out, ctx.out_uri
        report = validate_splits(splits, cfg.validate_data, docs_dir=out / "data_docs")
        (out / "report.html").write_text(render_report(report, data_uri))
        details: dict[str, str] = {"source_uri": data_uri}
        outputs = {"validated": out_uri, "data_docs": f"{out_uri}/data_docs/index.html"}
        if report.success:
            datasets.DatasetDict(splits).save_to_disk(str(out / "dataset"))
            for split, dataset in splits.items():
                sha = arrow_sha256(out / "dataset" / split)
                details[f"{split}_sha256"] = sha
                tracking.log_dataset(
                    name=f"beavertails-v/{split}",
                    source_uri=data_uri,
                    sha256=sha,
                    context="training" if split == "train" else "evaluation",
                    rows=len(dataset),
                    extra_tags={"validated_uri": f"{out_uri}/dataset/{split}"},
                )
            outputs["dataset"] = f"{out_uri}/dataset"
        else:
            details["failure"] = report.failure_message()
        result = ctx.finish(
            _metrics(report),
            status="succeeded" if report.success else "failed",
            outputs=outputs,
            details=details,
            files={"validation.json": report.to_dict(), "statistics.json": report.statistics},
            artifacts=["validation.json", "statistics.json", "report.html", "result.json", "data_docs"],
        )
        if not report.success:
            raise DataValidationError(f"data at {data_uri} failed validation:\n{report.failure_message()}")
    return result
