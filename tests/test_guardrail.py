"""The guardrail's loop with a scripted policy and guard: every branch, exactly."""

from __future__ import annotations

import pytest
from PIL import Image

from safe_rlhf_v.guardrail import (
    REFUSAL,
    SAFETY_INSTRUCTION,
    AnswerVerdict,
    Guardrail,
    QueryVerdict,
    answer_within,
    summarize,
)


class ScriptedPolicy:
    """Answers from a script: question -> list of successive answers; records every prompt."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = {q: list(answers) for q, answers in script.items()}
        self.prompts: list[str] = []

    def generate(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        self.prompts += questions
        return [self.script[q.removeprefix(f"{SAFETY_INSTRUCTION} ")].pop(0) for q in questions]


class ScriptedGuard:
    """Severe queries by name; answers containing 'harm' are unsafe (rating -2)."""

    def __init__(self, severities: dict[str, str]) -> None:
        self.severities = severities

    def judge_queries(self, images: list[Image.Image], questions: list[str]) -> list[QueryVerdict]:
        return [
            QueryVerdict(
                safe=self.severities.get(q, "safe") == "safe",
                severity=self.severities.get(q, "safe"),
                unsafe_probability=0.0,
            )
            for q in questions
        ]

    def judge_answers(
        self, images: list[Image.Image], questions: list[str], answers: list[str]
    ) -> list[AnswerVerdict]:
        return [self._judge(answer) for answer in answers]

    @staticmethod
    def _judge(answer: str) -> AnswerVerdict:
        harmful = "harm" in answer
        return AnswerVerdict(
            safe=not harmful,
            severity="moderate" if harmful else "safe",
            rating=-2 if harmful else 2,
            category="animal_abuse",
        )


IMAGE = Image.new("RGB", (8, 8))


def run(script: dict[str, list[str]], severities: dict[str, str], rounds: int = 5):
    policy = ScriptedPolicy(script)
    traces = Guardrail(policy, ScriptedGuard(severities), rounds=rounds).run(
        [IMAGE] * len(script), list(script)
    )
    return policy, traces


def test_safe_first_answer_is_kept_without_regeneration() -> None:
    policy, (trace,) = run({"q": ["fine answer"]}, {})
    assert trace.outcome == "answered" and trace.answer == "fine answer" and trace.rounds_used == 0
    assert policy.prompts == ["q"]


def test_regeneration_stops_at_the_first_safe_answer() -> None:
    policy, (trace,) = run({"q": ["harm 1", "harm 2", "safe now", "never asked"]}, {})
    assert trace.outcome == "regenerated"
    assert trace.answer == "safe now"
    assert trace.rounds_used == 2
    assert [a["answer"] for a in trace.attempts] == ["harm 1", "harm 2", "safe now"]
    assert policy.prompts == ["q", f"{SAFETY_INSTRUCTION} q", f"{SAFETY_INSTRUCTION} q"]


def test_fallback_refusal_after_the_last_round() -> None:
    policy, (trace,) = run({"q": ["harm"] * 4}, {}, rounds=3)
    assert trace.outcome == "fallback_refusal"
    assert trace.answer == REFUSAL
    assert trace.rounds_used == 3 and len(trace.attempts) == 4
    assert len(policy.prompts) == 4


def test_severe_query_is_refused_without_generation() -> None:
    policy, traces = run({"bad": ["harm"], "ok": ["fine"]}, {"bad": "severe"})
    bad, ok = traces
    assert bad.outcome == "refused_query" and bad.answer == REFUSAL and bad.attempts == []
    assert "bad" not in policy.prompts
    assert ok.outcome == "answered"


def test_moderate_query_is_answered_but_moderated() -> None:
    _, (trace,) = run({"q": ["harm", "fine"]}, {"q": "moderate"})
    assert trace.query.severity == "moderate" and trace.outcome == "regenerated"


def test_zero_rounds_filters_without_regeneration() -> None:
    policy, (trace,) = run({"q": ["harm", "unused"]}, {}, rounds=0)
    assert trace.outcome == "fallback_refusal" and len(policy.prompts) == 1


def test_batch_regenerates_only_the_unsafe_items_and_summary_counts() -> None:
    script = {"a": ["fine"], "b": ["harm", "fine b"], "c": ["harm"] * 6, "d": ["harm"]}
    policy, traces = run(script, {"d": "severe"})
    assert [t.outcome for t in traces] == ["answered", "regenerated", "fallback_refusal", "refused_query"]
    assert policy.prompts.count("a") == 1
    summary = summarize(traces, rounds=5)
    assert summary["unsafe_rate_policy"] == pytest.approx(2 / 3)  # b and c of the three answered
    assert summary["refused_queries"] == 1
    assert summary["unsafe_rate_after_level_1"] == pytest.approx(2 / 4)
    assert summary["unsafe_rate_after_level_3"] == 0.0
    assert summary["rounds_used"] == {"0": 1, "1": 1, "5": 1}
    assert summary["outcomes"] == {"answered": 1, "regenerated": 1, "fallback_refusal": 1, "refused_query": 1}


def test_bad_inputs_are_rejected() -> None:
    guardrail = Guardrail(ScriptedPolicy({}), ScriptedGuard({}))
    with pytest.raises(ValueError, match="empty question"):
        guardrail.run([IMAGE], ["   "])
    with pytest.raises(ValueError, match="1 images for 2 questions"):
        guardrail.run([IMAGE], ["a", "b"])
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        Guardrail(ScriptedPolicy({}), ScriptedGuard({}), rounds=-1)


def test_given_first_answers_are_judged_instead_of_sampled() -> None:
    policy = ScriptedPolicy({"a": ["never asked"], "b": ["fine b"]})
    traces = Guardrail(policy, ScriptedGuard({}), rounds=2).run([IMAGE] * 2, ["a", "b"], ["ok a", "harm b"])
    assert [t.answer for t in traces] == ["ok a", "fine b"]
    assert policy.prompts == [f"{SAFETY_INSTRUCTION} b"], "round 0 used the given answers"
    with pytest.raises(ValueError, match="1 first answers for 2 questions"):
        Guardrail(policy, ScriptedGuard({})).run([IMAGE] * 2, ["a", "b"], ["x"])


def test_answer_within_reads_every_smaller_budget_off_one_trace() -> None:
    _, (regenerated, refused) = run({"q": ["harm 1", "harm 2", "safe now"], "bad": ["x"]}, {"bad": "severe"})
    assert [answer_within(regenerated, k) for k in range(4)] == [
        (REFUSAL, True),
        (REFUSAL, True),
        ("safe now", False),
        ("safe now", False),
    ]
    assert answer_within(refused, 5) == (REFUSAL, True)
    with pytest.raises(ValueError, match="rounds must be >= 0"):
        answer_within(regenerated, -1)
