"""The HTML report and markdown summary render the summary's figures safely and self-contained."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from safe_rlhf_v.evaluate.metrics import PNG_SIGNATURE, summarize
from safe_rlhf_v.evaluate.report import write_report

HISTORY = [{"step": s, "lambda": 10.0 - s, "J_C": 1.0 - 0.5 * s, "reward": 0.1 * s} for s in range(1, 6)]


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    return summarize(records, bootstrap_samples=200, confidence=0.9, seed=0, cost_threshold=-0.5)


def _write(records: list[dict[str, Any]], out: Path, history: list[dict[str, Any]]) -> tuple[str, str]:
    paths = write_report(_summary(records), records, history, out, title="Demo run", threshold=-0.5)
    assert paths.html == out / "report.html"
    assert paths.markdown == out / "report.md"
    return paths.html.read_text(), paths.markdown.read_text()


def _cells(page: str) -> list[list[str]]:
    """The data rows of every table, in page order (header rows hold no <td>)."""
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]
    return [row for row in rows if row]


def test_both_files_hold_the_results_tables(records: list[dict[str, Any]], tmp_path: Path) -> None:
    page, markdown = _write(records, tmp_path, HISTORY)
    cells = _cells(page)
    # figures worked out by hand in conftest's docstring (see test_metrics)
    assert cells[0][0] == "mean reward [90% CI]"
    assert cells[0][1].startswith("0.875 [") and cells[0][2].startswith("1.000 [")
    assert cells[1][1].startswith("0.000 [") and cells[1][2].startswith("-1.375 [")
    assert cells[2] == ["J_C ≤ d = -0.5", "no", "yes"]
    assert cells[3][1].startswith("50.0% [") and cells[3][2].startswith("25.0% [")
    assert cells[5][1] == "safe 50% · minor 0% · moderate 25% · severe 25%"
    assert cells[6][0] == "attack success rate (2 harmful prompts) [90% CI]"
    assert cells[6][1].startswith("100.0% [") and cells[6][2].startswith("50.0% [")
    assert ["helpfulness", "reward model", "50.0%", "25.0%", "25.0%", "62.5%", "4"] in cells
    assert ["harmlessness", "cost model", "75.0%", "25.0%", "0.0%", "87.5%", "4"] in cells
    assert ["1", "25.0%", "50.0%", "25.0%", "0.300", "0.0%", "0.0%", "25.0%", "0.625"] in cells
    assert ["violence_and_physical_harm", "2", "100.0%", "50.0%", "0.750", "1.000"] in cells
    for row in (
        "| J_C ≤ d = -0.5 | no | yes |",
        "| attack success rate (2 harmful prompts) [90% CI] | 100.0% [",
        "| harmlessness | cost model | 75.0% | 25.0% | 0.0% | 87.5% | 4 |",
        "| 1 | 25.0% | 50.0% | 25.0% | 0.300 | 0.0% | 0.0% | 25.0% | 0.625 |",
        "| violence_and_physical_harm | 2 | 100.0% | 50.0% | 0.750 | 1.000 |",
        "| attack success rate (0 harmful prompts) [90% CI] | n/a | n/a |",
    ):
        assert row in markdown
    assert "last step 5; lambda = 5; J_C = -1.5 (budget d = -0.5)" in markdown
    assert "data:image" not in markdown


def test_answers_are_escaped(records: list[dict[str, Any]], tmp_path: Path) -> None:
    records[0]["trained"]["answer"] = "<script>alert('x')</script> & <img src=x onerror=1>"
    page, markdown = _write(records, tmp_path, HISTORY)
    assert "<script" not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &lt;img src=x onerror=1&gt;" in page
    assert "alert" not in markdown


def test_plots_and_example_image_are_inline_pngs(records: list[dict[str, Any]], tmp_path: Path) -> None:
    page, _ = _write(records, tmp_path, HISTORY)
    sources = re.findall(r'<img alt="([^"]*)" src="([^"]*)"', page)
    alts = [alt for alt, _ in sources]
    assert alts == [
        "evaluation: reward vs cost of every answer",
        "evaluation: harmful share per category",
        "benign: reward vs cost of every answer",
        "benign: harmful share per category",
        "lambda and J_C over training",
        "prompt image",
    ]
    for _, src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"))[:8] == PNG_SIGNATURE
    assert sources[-1][1].endswith(records[0]["image_png"])
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "default-src 'none'" in page


def test_empty_history_renders_without_training_plot(records: list[dict[str, Any]], tmp_path: Path) -> None:
    page, markdown = _write(records, tmp_path, [])
    assert "lambda and J_C over training" not in page
    assert page.count("No PPO training history was recorded") == 1
    assert "No PPO training history was recorded" in markdown


def test_external_judge_rows_and_bad_history(records: list[dict[str, Any]], tmp_path: Path) -> None:
    summary = _summary(records)
    summary["external_judge"] = {
        "evaluation": {"helpfulness": {"win": 0.5, "tie": 0.5, "loss": 0.0, "n": 2, "malformed": 1}}
    }
    paths = write_report(summary, records, [], tmp_path, title="t", threshold=-0.5)
    assert ["helpfulness", "external judge", "50.0%", "50.0%", "0.0%", "75.0%", "2 (1 malformed)"] in _cells(
        paths.html.read_text()
    )
    with pytest.raises(ValueError, match="training history entry 1 has no 'step' key"):
        write_report(
            summary, records, [{"step": 1, "J_C": 0.0}, {"J_C": 1.0}], tmp_path, title="t", threshold=0
        )


def test_reference_judge_rows_and_a_disagreement_warning(
    disagreeing_records: list[dict[str, Any]], tmp_path: Path
) -> None:
    page, markdown = _write(disagreeing_records, tmp_path, HISTORY)
    cells = _cells(page)
    assert any(
        row[0] == "ground truth: harmful share [90% CI]" and row[2].startswith("100.0% [") for row in cells
    )
    assert ["cost model", "50.0%", "25.0%", "less harmful"] in cells
    assert ["ground truth", "50.0%", "100.0%", "more harmful"] in cells
    # pooled answers: guard unsafe on initial 0, 1 and trained 1; truly harmful: initial 0, 1, all trained
    assert ["guard", "62.5%", "3", "0", "3", "2", "8"] in cells
    warning = (
        "The cost model and the ground truth disagree: the ground truth finds the trained policy more harmful"
    )
    assert page.count('class="warning"') == 2 and warning in page
    assert f"> **Warning:** {warning}" in markdown
