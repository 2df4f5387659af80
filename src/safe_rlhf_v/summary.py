"""The end-of-run summary `safe-rlhf-v run` prints: every stage's status, headline figures, outputs.

Every figure a stage produced is in the run's `summary.json`; the printout keeps to the few that
tell whether the run worked (the ones the acceptance targets are stated in).
"""

from __future__ import annotations

from typing import Any

from safe_rlhf_v.pipelines.local import LocalRun

STAGE_ORDER = ("validate-data", "train-reward", "train-cost")
HEADLINES: dict[str, tuple[str, ...]] = {
    "validate-data": (
        "train.rows",
        "evaluation.rows",
        "train.safe_ratio",
        "failed_expectations",
        "leaked_images",
    ),
    "train-reward": ("accuracy", "reward_safe_mean", "reward_harmful_mean"),
    "train-cost": ("pairwise_accuracy", "sign_accuracy", "cost_safe_mean", "cost_harmful_mean"),
}


def _figure(value: float) -> str:
    return f"{value:.4g}"


def _ordered(stages: dict[str, Any]) -> list[str]:
    known = [name for name in STAGE_ORDER if name in stages]
    return known + sorted(set(stages) - set(known))


def format_summary(run: LocalRun) -> str:
    """Human-readable summary; the same facts and every figure are in `run.summary_path` as JSON."""
    lines = [f"pipeline {'SUCCEEDED' if run.succeeded else 'FAILED'}"]
    if run.error:
        lines.append(f"  error: {run.error}")
    for stage in _ordered(run.stages):
        result = run.stages[stage]
        metrics = result.get("metrics", {})
        shown = [key for key in HEADLINES.get(stage, tuple(sorted(metrics))) if key in metrics]
        figures = ", ".join(f"{key}={_figure(metrics[key])}" for key in shown)
        lines.append(f"- {stage}: {result['status']}" + (f"  {figures}" if figures else ""))
        for name, uri in sorted(result.get("outputs", {}).items()):
            lines.append(f"    {name}: {uri}")
    lines += [
        f"outputs:  {run.run_dir}",
        f"summary:  {run.summary_path}  (every figure of every stage)",
        f"MLflow:   {run.tracking_uri}",
        f"          browse with: mlflow ui --backend-store-uri {run.tracking_uri}",
    ]
    return "\n".join(lines)
