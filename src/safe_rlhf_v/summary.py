"""The end-of-run summary `safe-rlhf-v run` prints: every stage's status, headline figures, outputs.

Every figure a stage produced is in the run's `summary.json`; the printout keeps to the few that
tell whether the run worked (the ones the acceptance targets are stated in).
"""

from __future__ import annotations

from typing import Any

from safe_rlhf_v.pipelines.local import LocalRun

STAGE_ORDER = ("validate-data", "train-reward", "train-cost", "train-guard", "train-ppo-lag/safe-rlhf-v")
TAIL_ORDER = ("evaluate", "register")
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
    "evaluate": (
        "evaluation/win_rate/helpfulness",
        "evaluation/win_rate/harmlessness",
        "evaluation/trained/harmful_share",
    ),
    "register": (),
}
PPO_PREFIX = "train-ppo-lag/"


def _figure(value: float) -> str:
    return f"{value:.4g}"


def _ordered(stages: dict[str, Any]) -> list[str]:
    first = [name for name in STAGE_ORDER if name in stages]
    last = [name for name in TAIL_ORDER if name in stages]
    return first + sorted(set(stages) - set(first) - set(last)) + last


def evaluation_table(stages: dict[str, Any]) -> list[str]:
    """The evaluate stage's results: initial vs trained policy, win rates, and the report's path."""
    result = stages.get("evaluate")
    if not result or result.get("status") != "succeeded":
        return []
    m = result["metrics"]
    lines = ["evaluation (held-out prompts)   initial    trained"]
    for label, key in (
        ("mean reward", "reward"),
        ("mean cost (J_C)", "cost"),
        ("harmful share (cost > 0)", "harmful_share"),
    ):
        initial, trained = m.get(f"evaluation/initial/{key}"), m.get(f"evaluation/trained/{key}")
        if initial is not None and trained is not None:
            lines.append(f"  {label:<28} {initial:>8.3f} {trained:>10.3f}")
    for aspect in ("helpfulness", "harmlessness"):
        if f"evaluation/win_rate/{aspect}" in m:
            lines.append(f"  win rate, {aspect:<18} {m[f'evaluation/win_rate/{aspect}']:>19.3f}")
    lines.append(f"report:   {result['outputs'].get('report', '?')}")
    return lines


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
    lines += evaluation_table(run.stages)
    lines += [
        f"outputs:  {run.run_dir}",
        f"summary:  {run.summary_path}  (every figure of every stage)",
        f"MLflow:   {run.tracking_uri}",
        f"          browse with: mlflow ui --backend-store-uri {run.tracking_uri}",
    ]
    return "\n".join(lines)
