"""The evaluation report: one self-contained HTML page and a markdown summary with the same tables.

The HTML is what people open from MLflow or the Kubeflow UI, which shows HTML artifacts in a
sandboxed frame: everything is inline (CSS, plots as base64 PNG data URIs), nothing is fetched, and
a Content-Security-Policy forbids scripts outright. Answers are model output, so Jinja2's autoescape
renders them as text; the markdown summary leaves them out entirely because markdown viewers pass
raw HTML through. Plots are drawn on matplotlib's Agg canvas without pyplot's global state.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jinja2
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from safe_rlhf_v.data.schema import SEVERITIES
from safe_rlhf_v.evaluate.metrics import ASPECTS, POLICIES, EvalRecord, parse_records
from safe_rlhf_v.storage import atomic_write_text

HTML_NAME: Final = "report.html"
MARKDOWN_NAME: Final = "report.md"
COLOURS: Final = {"initial": "#7f8c9b", "trained": "#d9822b"}
SCORE_JUDGES: Final = {"helpfulness": "reward model", "harmlessness": "cost model"}


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_report` put the two files."""

    html: Path
    markdown: Path


@dataclass(frozen=True)
class Table:
    """A captioned table of preformatted cells, rendered alike into HTML and markdown."""

    caption: str
    headers: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class SetSection:
    """Everything the report shows about one prompt set."""

    name: str
    n: int
    tables: list[Table]
    plots: list[tuple[str, str]]
    """(alt text, base64 PNG)."""
    warnings: list[str]
    """Judges that disagree with the reference judge, shown above the tables."""


# --- formatting ---------------------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _with_ci(figure: Mapping[str, float], fmt: Callable[[float], str]) -> str:
    return f"{fmt(figure['mean'])} [{fmt(figure['low'])}, {fmt(figure['high'])}]"


def _mix(shares: Mapping[str, float]) -> str:
    return " · ".join(f"{level} {100 * shares[level]:.0f}%" for level in SEVERITIES)


# --- tables -------------------------------------------------------------------------------------


def _share_ci(figure: Mapping[str, float] | None) -> str:
    return "n/a" if figure is None else _with_ci(figure, _pct)


def _results_table(figures: Mapping[str, Any], confidence: float, threshold: float) -> Table:
    ci = f"[{100 * confidence:.0f}% CI]"
    policies = [figures["policies"][policy] for policy in POLICIES]
    rows = [
        (f"mean reward {ci}", *(_with_ci(p["reward"], _num) for p in policies)),
        (f"mean cost J_C {ci}", *(_with_ci(p["cost"], _num) for p in policies)),
        (f"J_C ≤ d = {threshold:g}", *("yes" if p["meets_threshold"] else "no" for p in policies)),
        (f"harmful share (cost > 0) {ci}", *(_share_ci(p["harmful_share"]) for p in policies)),
        (f"guard unsafe rate {ci}", *(_share_ci(p["guard_unsafe_rate"]) for p in policies)),
        ("guard severity mix", *(_mix(p["severity_mix"]) for p in policies)),
        (
            f"attack success rate ({figures['harmful_prompts']} harmful prompts) {ci}",
            *(_share_ci(p["attack_success_rate"]) for p in policies),
        ),
    ]
    if all("truth" in p for p in policies):
        truths = [p["truth"] for p in policies]
        rows += [
            (f"ground truth: harmful share {ci}", *(_share_ci(t["harmful_share"]) for t in truths)),
            (
                f"ground truth: harmful share on harmful-image prompts {ci}",
                *(_share_ci(t["harmful_share_on_harmful_images"]) for t in truths),
            ),
            (
                f"ground truth: off-distribution share {ci}",
                *(_share_ci(t["off_distribution_share"]) for t in truths),
            ),
            (
                f"ground truth: mean helpfulness rate {ci}",
                *(_with_ci(t["helpful_rate"], _num) for t in truths),
            ),
            (
                f"ground truth: mean harmlessness rate {ci}",
                *(_with_ci(t["harmless_rate"], _num) for t in truths),
            ),
        ]
    return Table("Initial vs trained policy (no guardrail)", ("", *POLICIES), rows)


def _win_table(figures: Mapping[str, Any], external: Mapping[str, Any] | None) -> Table:
    duels = [
        (aspect, SCORE_JUDGES[aspect], shares, str(shares["n"]))
        for aspect, shares in ((a, figures["win_rate"][a]) for a in ASPECTS)
    ]
    duels += [
        (aspect, "ground truth", shares, str(shares["n"]))
        for aspect, shares in figures.get("truth_win_rate", {}).items()
    ]
    duels += [
        (aspect, "external judge", shares, f"{shares['n']} ({shares['malformed']} malformed)")
        for aspect, shares in (external or {}).items()
    ]
    rows = [
        (aspect, judge, *(_pct(s[k]) for k in ("win", "tie", "loss")), _pct(s["win"] + s["tie"] / 2), n)
        for aspect, judge, s, n in duels
    ]
    headers = ("aspect", "judge", "win", "tie", "loss", "win rate (ties count half)", "n")
    return Table("Trained vs initial, pairwise per prompt", headers, rows)


def _judges_table(figures: Mapping[str, Any]) -> Table:
    rows = [
        (row["judge"], _pct(row["initial"]), _pct(row["trained"]), row["direction"])
        for row in figures["judges"]["rows"]
    ]
    return Table(
        "Every judge of harm (external judge: share of prompts where that policy's answer was the less safe)",
        ("judge", "initial", "trained", "trained policy is"),
        rows,
    )


def _agreement_table(figures: Mapping[str, Any]) -> Table:
    rows = [
        (judge, _pct(c["accuracy"]), str(c["tp"]), str(c["fp"]), str(c["fn"]), str(c["tn"]), str(c["n"]))
        for judge, c in figures["truth_agreement"].items()
    ]
    headers = ("learned judge", "accuracy", "harmful, truly harmful", "harmful, truly safe",
               "safe, truly harmful", "safe, truly safe", "answers")  # fmt: skip
    return Table("Learned judges against the ground truth (both policies' answers)", headers, rows)


def _warnings(figures: Mapping[str, Any]) -> list[str]:
    """The visible warning of a learned judge that disagrees in direction with the reference judge."""
    judges = figures["judges"]
    return [
        f"The {name} and the {judges['reference']} disagree: the {judges['reference']} finds the trained "
        f"policy {judges['direction']}, the {name} does not. Trust the {judges['reference']}."
        for name in judges["disagree"]
    ]


def _guardrail_table(figures: Mapping[str, Any]) -> Table:
    headers = ["re-generations k"]
    for policy in POLICIES:
        headers += [f"{policy}: harmful", f"{policy}: ASR", f"{policy}: refused", f"{policy}: reward"]
    rows = []
    for k, by_round in enumerate(zip(*(figures["guardrail"][p] for p in POLICIES), strict=True)):
        cells = [str(k)]
        for row in by_round:
            cells += [
                _pct(row["harmful_share"]),
                _pct(row["attack_success_rate"]),
                _pct(row["refusal_rate"]),
                _num(row["reward"]),
            ]
        rows.append(tuple(cells))
    return Table("Behind the guardrail, by re-generation budget", tuple(headers), rows)


def _category_table(figures: Mapping[str, Any]) -> Table:
    rows = [
        (
            category,
            str(row["n"]),
            *(_pct(row[p]["harmful_share"]) for p in POLICIES),
            *(_num(row[p]["reward"]) for p in POLICIES),
        )
        for category, row in figures["categories"].items()
    ]
    headers = ("category", "n", "initial: harmful", "trained: harmful", "initial: reward", "trained: reward")
    return Table("Per harm category", headers, rows)


# --- plots --------------------------------------------------------------------------------------


def _png(figure: Figure) -> str:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _scatter(name: str, rows: Sequence[EvalRecord]) -> str:
    """Reward against cost of every answer: the trained cloud should sit up and to the left."""
    figure = Figure(figsize=(6.4, 4.4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for policy in POLICIES:
        costs = [getattr(row, policy).cost for row in rows]
        rewards = [getattr(row, policy).reward for row in rows]
        axes.scatter(costs, rewards, s=18, alpha=0.6, color=COLOURS[policy], label=policy)
        axes.scatter(
            [sum(costs) / len(costs)], [sum(rewards) / len(rewards)], s=140, marker="X",
            color=COLOURS[policy], edgecolors="black", label=f"{policy} mean",
        )  # fmt: skip
    axes.axvline(0.0, color="#c62828", linestyle="--", linewidth=1, label="cost = 0 (harmful to the right)")
    axes.set(xlabel="cost (cost model)", ylabel="reward (reward model)", title=f"{name}: reward vs cost")
    axes.legend(fontsize=8)
    return _png(figure)


def _category_bars(name: str, categories: Mapping[str, Any]) -> str:
    """Harmful share per category, initial beside trained."""
    names = list(categories)
    figure = Figure(figsize=(7.5, 1.2 + 0.38 * len(names)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    positions = range(len(names))
    for offset, policy in zip((-0.2, 0.2), POLICIES, strict=True):
        bars = axes.barh(
            [p + offset for p in positions],
            [categories[c][policy]["harmful_share"] for c in names],
            height=0.4, color=COLOURS[policy], label=policy,
        )  # fmt: skip
        axes.bar_label(bars, fmt="{:.0%}", fontsize=7, padding=2)
    axes.set_yticks(list(positions), [c.replace("_", " ") for c in names], fontsize=8)
    axes.invert_yaxis()
    axes.set(xlabel="harmful share (cost > 0)", xlim=(0, 1), title=f"{name}: harmful share per category")
    axes.legend(fontsize=8)
    return _png(figure)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(float(item["step"]), float(item[key])) for item in history if key in item]
    return [step for step, _ in points], [value for _, value in points]


def _training_plot(history: Sequence[Mapping[str, Any]], threshold: float) -> str | None:
    """Lambda and J_C over PPO steps with the budget d; None when the history has neither."""
    for position, item in enumerate(history):
        if "step" not in item:
            raise ValueError(f"training history entry {position} has no 'step' key (keys: {sorted(item)})")
    lam, cost = _series(history, "lambda"), _series(history, "J_C")
    if not (lam[0] or cost[0]):  # neither series has a point
        return None
    figure = Figure(figsize=(10, 3.6), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot(*lam, color="#2b6cb0", marker=".")
    left.set(xlabel="PPO step", ylabel="λ", title="Lagrange multiplier λ")
    right.plot(*cost, color="#d9822b", marker=".", label="J_C (mean episode cost)")
    right.axhline(threshold, color="#c62828", linestyle="--", label=f"budget d = {threshold:g}")
    right.set(xlabel="PPO step", ylabel="J_C", title="Expected cost J_C")
    right.legend(fontsize=8)
    return _png(figure)


# --- assembly -----------------------------------------------------------------------------------


def _sections(summary: Mapping[str, Any], records: Sequence[EvalRecord]) -> list[SetSection]:
    confidence = summary["settings"]["confidence"]
    threshold = summary["settings"]["cost_threshold"]  # the budget `meets_threshold` was computed with
    external = summary.get("external_judge") or {}
    sections = []
    for name, figures in summary["sets"].items():
        rows = [record for record in records if record.set == name]
        tables = [
            _results_table(figures, confidence, threshold),
            _win_table(figures, external.get(name)),
            _judges_table(figures),
            *([_agreement_table(figures)] if "truth_agreement" in figures else []),
            _guardrail_table(figures),
            _category_table(figures),
        ]
        plots = []
        if rows:
            plots.append((f"{name}: reward vs cost of every answer", _scatter(name, rows)))
        if figures["categories"]:
            plots.append((f"{name}: harmful share per category", _category_bars(name, figures["categories"])))
        sections.append(
            SetSection(name=name, n=figures["n"], tables=tables, plots=plots, warnings=_warnings(figures))
        )
    return sections


def _md_text(value: str) -> str:
    """Markdown viewers pass raw HTML through: escape it, so set names and titles stay text."""
    return html.escape(value, quote=False)


def _md_cell(value: str) -> str:
    return _md_text(value).replace("|", "\\|").replace("\n", " ")


_ENV = jinja2.Environment(
    loader=jinja2.DictLoader(
        {
            HTML_NAME: """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,sans-serif;color:#222}
body{margin:1.5rem auto;max-width:1200px;padding:0 1rem}
table{border-collapse:collapse;margin:0.4rem 0 1.2rem}
caption{text-align:left;font-weight:600;padding:0.3rem 0}
th,td{border:1px solid #ccc;padding:4px 8px;font-size:0.88rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
img{max-width:100%}
.settings{color:#555;font-size:0.9rem}
.warning{background:#fdecea;border-left:4px solid #c62828;padding:0.5rem 0.8rem;font-weight:600}
.examples{display:grid;grid-template-columns:1fr 1fr;gap:0.6rem;margin-bottom:1.4rem}
.example-head{grid-column:1 / span 2;background:#f7f7f7;padding:0.5rem;border-top:2px solid #999}
.answer{border:1px solid #ddd;padding:0.5rem;font-size:0.9rem}
.answer-text{white-space:pre-wrap}
.answer h4{margin:0 0 0.3rem}
</style></head><body>
<h1>{{ title }}</h1>
<p class="settings">{{ settings }}</p>
{% for section in sections %}
<h2>Prompt set “{{ section.name }}” ({{ section.n }} prompts)</h2>
{% for warning in section.warnings %}<p class="warning">⚠ {{ warning }}</p>
{% endfor %}{% for table in section.tables %}
<table><caption>{{ table.caption }}</caption>
<thead><tr>{% for h in table.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in table.rows %}
<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}
</tbody>
</table>
{% endfor %}
{% for alt, png in section.plots %}
<p><img alt="{{ alt }}" src="data:image/png;base64,{{ png }}"></p>{% endfor %}
{% endfor %}
<h2>Training (PPO-Lagrangian)</h2>
{% if training_plot %}
<p><img alt="lambda and J_C over training" src="data:image/png;base64,{{ training_plot }}"></p>
{% else %}<p>No PPO training history was recorded for this policy.</p>{% endif %}
{% if examples %}<h2>Example answers</h2>
<div class="examples">
{% for ex in examples %}
<div class="example-head"><strong>{{ ex.set }} #{{ ex.index }}</strong> · {{ ex.category }}<br>
{% if ex.image_png %}<img alt="prompt image" src="data:image/png;base64,{{ ex.image_png }}"><br>{% endif %}
{{ ex.question }}</div>
{% for policy in policies %}{% set a = ex[policy] %}
<div class="answer"><h4>{{ policy }} · reward {{ "%.3f"|format(a.reward) }}
 · cost {{ "%.3f"|format(a.cost) }} · guard: {{ a.guard_severity }}</h4>
<div class="answer-text">{{ a.answer }}</div></div>
{% endfor %}
{% endfor %}
</div>{% endif %}
</body></html>
""",
            MARKDOWN_NAME: """# {{ title|md_text }}

{{ settings|md_text }}
{% for section in sections %}

## Prompt set "{{ section.name|md_text }}" ({{ section.n }} prompts)
{% for warning in section.warnings %}

> **Warning:** {{ warning|md_text }}
{% endfor %}{% for table in section.tables %}

**{{ table.caption|md_text }}**

| {{ table.headers|map("md_cell")|join(" | ") }} |
|{% for _ in table.headers %}---|{% endfor %}
{% for row in table.rows %}| {{ row|map("md_cell")|join(" | ") }} |
{% endfor %}{% endfor %}{% endfor %}

## Training (PPO-Lagrangian)

{{ training_line }}

Plots and example answers are in the HTML report.
""",
        }
    ),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html",)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)
_ENV.filters["md_cell"] = _md_cell
_ENV.filters["md_text"] = _md_text


def _training_line(history: Sequence[Mapping[str, Any]], threshold: float) -> str:
    if not history:
        return "No PPO training history was recorded for this policy."
    last = history[-1]
    figures = [f"{len(history)} logged steps, last step {last['step']}"]
    figures += [f"{key} = {float(last[key]):.4g}" for key in ("lambda", "J_C") if key in last]
    return "; ".join(figures) + f" (budget d = {threshold:g})."


def write_report(
    summary: Mapping[str, Any],
    records: Iterable[Mapping[str, Any]],
    history: Sequence[Mapping[str, Any]],
    out_dir: Path,
    *,
    title: str,
    threshold: float,
) -> ReportPaths:
    """Render `summarize`'s output, the per-prompt records and PPO's per-step history (may be empty)
    into `out_dir/report.html` and `out_dir/report.md`.

    `threshold` is the budget d drawn on the training curve of J_C; the results tables use the
    budget `summarize` judged `meets_threshold` with (the stage passes the same value to both).
    Example answers are the records carrying `image_png`: the stage attaches images to the few
    prompts it wants shown (`evaluate.examples`), so that one setting decides both.
    """
    parsed = parse_records(records)
    settings = summary["settings"]
    context = {
        "title": title,
        "settings": (
            f"{100 * settings['confidence']:.0f}% intervals: Wilson for shares, percentile bootstrap "
            f"from {settings['bootstrap_samples']} resamples for means; score ties within "
            f"{settings['tie_margin']:g}; "
            f"cost budget d = {settings['cost_threshold']:g}; a cost > 0 marks a harmful answer."
        ),
        "sections": _sections(summary, parsed),
        "policies": POLICIES,
    }
    page = _ENV.get_template(HTML_NAME).render(
        **context,
        training_plot=_training_plot(history, threshold),
        examples=[record for record in parsed if record.image_png is not None],
    )
    markdown = _ENV.get_template(MARKDOWN_NAME).render(
        **context, training_line=_training_line(history, threshold)
    )
    out_dir = Path(out_dir)
    paths = ReportPaths(html=out_dir / HTML_NAME, markdown=out_dir / MARKDOWN_NAME)
    atomic_write_text(paths.html, page)
    atomic_write_text(paths.markdown, markdown)
    return paths
