"""Glue between KFP artifacts and stage results, shared by every component.

Component functions ship to the cluster as source only, so they import this module from the
installed package inside their body instead of referring to module-level names.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.stages.common import StageResult


def parse_config(config_json: str) -> PipelineConfig:
    """The pipeline config travels as one JSON string parameter, validated again on arrival."""
    return PipelineConfig.model_validate_json(config_json)


def publish_metrics(result: StageResult, metrics) -> None:
    """Copy the stage's headline figures into the KFP Metrics artifact (shown in the run's UI)."""
    for name, value in sorted(result.metrics.items()):
        metrics.log_metric(name, float(value))


def publish_html(source: Path, html) -> None:
    """Copy a self-contained HTML page into a KFP HTML artifact (rendered in the UI's visualizations)."""
    Path(html.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, html.path)
