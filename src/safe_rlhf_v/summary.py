"""The end-of-run summary `safe-rlhf-v run` prints: every stage's status, figures and outputs."""

from __future__ import annotations

from safe_rlhf_v.pipelines.local import LocalRun


def _figure(value: float) -> str:
    return f"{value:.4g}"


def format_summary(run: LocalRun) -> str:
    """Human-readable summary; the same facts are in `run.summary_path` as JSON."""
    lines = [f"pipeline {'SUCCEEDED' if run.succeeded else 'FAILED'}"]
    if run.error:
        lines.append(f"  error: {run.error}")
    for stage, result in run.stages.items():
        lines.append(f"- {stage}: {result['status']}")
        metrics = result.get("metrics", {})
        if metrics:
            lines.append("    " + ", ".join(f"{k}={_figure(v)}" for k, v in sorted(metrics.items())))
        for name, uri in sorted(result.get("outputs", {}).items()):
            lines.append(f"    {name}: {uri}")
    lines += [
        f"outputs:  {run.run_dir}",
        f"summary:  {run.summary_path}",
        f"MLflow:   {run.tracking_uri}",
        f"          browse with: mlflow ui --backend-store-uri {run.tracking_uri}",
    ]
    return "\n".join(lines)
