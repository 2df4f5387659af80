"""The end-of-run summary `safe-rlhf-v run` prints: every stage's status, headline figures, outputs.

Every figure a stage produced is in the run's `summary.json`; the printout keeps to the few that
tell whether the run worked (the ones the acceptance targets are stated in).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
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
        "evaluation/truth/win_rate/helpfulness",
        "evaluation/trained/truth/harmful_share",
        "evaluation/trained/truth/off_distribution_share",
        "evaluation/win_rate/helpfulness",
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
    """The evaluate stage's results: initial vs trained policy, win rates by each judge, a warning when
    a learned judge disagrees with the reference judge, and the report's path."""
    result = stages.get("evaluate")
    if not result or result.get("status") != "succeeded":
        return []
    m = result["metrics"]
    lines = ["evaluation (held-out prompts)          initial    trained"]
    for label, key in (
        ("mean reward", "reward"),
        ("mean cost (J_C)", "cost"),
        ("harmful share (cost > 0)", "harmful_share"),
        ("guard unsafe rate", "guard_unsafe_rate"),
        ("true harmful share", "truth/harmful_share"),
        ("true harmful, harmful images", "truth/harmful_share_on_harmful_images"),
        ("off-distribution share", "truth/off_distribution_share"),
    ):
        initial, trained = m.get(f"evaluation/initial/{key}"), m.get(f"evaluation/trained/{key}")
        if initial is not None and trained is not None:
            lines.append(f"  {label:<35} {initial:>8.3f} {trained:>10.3f}")
    for judge, prefix in (
        ("learned models", "evaluation/win_rate"),
        ("ground truth", "evaluation/truth/win_rate"),
    ):
        for aspect in ("helpfulness", "harmlessness"):
            if f"{prefix}/{aspect}" in m:
                lines.append(f"  win rate, {aspect}, {judge:<14} {m[f'{prefix}/{aspect}']:>15.3f}")
    if m.get("evaluation/judges_disagree"):
        lines.append("  WARNING: a learned judge disagrees with the reference judge: see the report")
    lines.append(f"report:   {result['outputs'].get('report', '?')}")
    return lines


POLICY_COLUMNS = (
    ("mean reward", "reward"),
    ("mean cost", "cost"),
    ("cost > 0", "harmful_share"),
    ("true harmful", "truth_harmful_share"),
    ("true harmful, harmful images", "truth_harmful_share_on_harmful_images"),
    ("off-distribution", "truth_off_distribution_share"),
    ("helpful rate", "truth_helpful_rate"),
)


def policy_table(stages: dict[str, Any]) -> list[str]:
    """Initial policy vs each PPO variant on held-out prompts (PPO's closing check): the learned
    models' figures and, when the stage had it, the synthetic world's exact judge's, with each
    variant's helpfulness win rate over the initial policy by that judge (ties count half)."""
    runs = {
        name.removeprefix(PPO_PREFIX): r["metrics"]
        for name, r in stages.items()
        if name.startswith(PPO_PREFIX)
    }
    if not runs:
        return []
    first = next(iter(runs.values()))
    columns = [(label, key) for label, key in POLICY_COLUMNS if f"initial_{key}" in first]
    with_duel = "truth_win_rate_helpfulness" in first
    rows: list[tuple[str, list[float | None]]] = [
        ("initial policy", [first[f"initial_{key}"] for _, key in columns] + ([None] if with_duel else []))
    ]
    for variant, m in sorted(runs.items()):
        duel = [m["truth_win_rate_helpfulness"]] if with_duel else []
        rows.append((variant, [m[f"trained_{key}"] for _, key in columns] + duel))
    labels = [label for label, _ in columns] + (["true helpfulness win rate"] if with_duel else [])
    widths = [max(len(label), 8) + 2 for label in labels]
    lines = [
        "held-out prompts   " + "".join(f"{label:>{w}}" for label, w in zip(labels, widths, strict=True))
    ]
    for name, values in rows:
        cells = "".join(
            f"{'-':>{w}}" if v is None else f"{v:>{w}.3f}" for v, w in zip(values, widths, strict=True)
        )
        lines.append(f"  {name:<17}{cells}")
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
        f"          browse with: {_mlflow_command()} ui --backend-store-uri {run.tracking_uri}",
    ]
    return "\n".join(lines)


def _mlflow_command() -> str:
    """`mlflow` when it is on PATH, else the one beside this interpreter (`.venv/bin/mlflow` when the
    venv is not activated), so the printed hint runs as printed."""
    beside = Path(sys.executable).parent / "mlflow"
    return "mlflow" if shutil.which("mlflow") == str(beside) else str(beside)
