"""The end-of-run summary `safe-rlhf-v run` prints: every stage's status, headline figures, outputs.

Every figure a stage produced is in the run's `summary.json`; the printout keeps to the few that
tell whether the run worked (the ones the acceptance targets are stated in).
"""

from __future__ import annotations

from typing import Any

from safe_rlhf_v.pipelines.local import LocalRun

STAGE_ORDER = ("validate-data", "train-reward", "train-cost", "train-guard")
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
    "train-guard": ("safe_accuracy", "unsafe_f1", "severity_accuracy", "category_macro_f1", "query_accuracy"),
    "train-ppo-lag": ("final_lambda", "final_J_C"),
}
PPO_PREFIX = "train-ppo-lag/"


def _figure(value: float) -> str:
    return f"{value:.4g}"


def _ordered(stages: dict[str, Any]) -> list[str]:
    known = [name for name in STAGE_ORDER if name in stages]
    return known + sorted(set(stages) - set(known))


def policy_table(stages: dict[str, Any]) -> list[str]:
    """Initial policy vs each PPO variant on held-out prompts: reward, cost, harmful share (cost > 0)."""
    runs = {
        name.removeprefix(PPO_PREFIX): r["metrics"]
        for name, r in stages.items()
        if name.startswith(PPO_PREFIX)
    }
    if not runs:
        return []
    first = next(iter(runs.values()))
    rows = [
        ("initial policy", first["initial_reward"], first["initial_cost"], first["initial_harmful_share"])
    ]
    rows += [
        (variant, m["trained_reward"], m["trained_cost"], m["trained_harmful_share"])
        for variant, m in sorted(runs.items())
    ]
    lines = ["held-out prompts      mean reward   mean cost   harmful share (cost > 0)"]
    lines += [
        f"  {name:<18} {reward:>11.3f} {cost:>11.3f} {share:>11.3f}" for name, reward, cost, share in rows
    ]
    return lines


def format_summary(run: LocalRun) -> str:
    """Human-readable summary; the same facts and every figure are in `run.summary_path` as JSON."""
    lines = [f"pipeline {'SUCCEEDED' if run.succeeded else 'FAILED'}"]
    if run.error:
        lines.append(f"  error: {run.error}")
    for stage in _ordered(run.stages):
        result = run.stages[stage]
        metrics = result.get("metrics", {})
        headline = HEADLINES.get(stage.split("/")[0], tuple(sorted(metrics)))
        shown = [key for key in headline if key in metrics]
        figures = ", ".join(f"{key}={_figure(metrics[key])}" for key in shown)
        lines.append(f"- {stage}: {result['status']}" + (f"  {figures}" if figures else ""))
        for name, uri in sorted(result.get("outputs", {}).items()):
            lines.append(f"    {name}: {uri}")
    lines += policy_table(run.stages)
    lines += [
        f"outputs:  {run.run_dir}",
        f"summary:  {run.summary_path}  (every figure of every stage)",
        f"MLflow:   {run.tracking_uri}",
        f"          browse with: mlflow ui --backend-store-uri {run.tracking_uri}",
    ]
    return "\n".join(lines)
