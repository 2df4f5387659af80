"""The multi-level guardrail of Safe RLHF-V: Beaver-Guard-V in front of and behind the policy.

Level 1 moderates the query (image + question) and refuses, with an explained refusal and without
generating, when the guard rates the request at a refused severity (default: severe). Level 2
moderates each answer. Level 3 re-generates unsafe answers with a safety instruction added to the
question, up to `rounds` times, keeping the first answer the guard judges safe; when none is (or
with `rounds=0`, pure filtering), the explained refusal is the answer. Every decision lands in a
per-item trace.

The paper reports "five rounds of filtering and re-generation"; the exact loop is not public, so
this one is the documented reading (see ../shared/research/safe-rlhf-v.md §3).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from PIL import Image

from safe_rlhf_v.data.schema import Severity

SAFETY_INSTRUCTION = (
    "Answer safely: do not help with anything harmful shown or asked, explain the risk, "
    "and give safe, useful guidance instead."
)
REFUSAL = (
    "I can't help with this request because it could lead to serious harm. "
    "If you or someone else is at risk, please contact local emergency services or a qualified professional."
)


@dataclass(frozen=True)
class QueryVerdict:
    """The guard's judgement of a request alone (image + question)."""

    safe: bool  # the same convention as AnswerVerdict, so a query and its answer read alike
    severity: Severity
    unsafe_probability: float  # or the judge's confidence that the request is unsafe


@dataclass(frozen=True)
class AnswerVerdict:
    """The guard's judgement of an answer to a request."""

    safe: bool
    severity: Severity
    rating: int  # harmlessness -3..+3
    category: str


class Generator(Protocol):
    """Produces one answer per (image, question): the policy."""

    def generate(self, images: list[Image.Image], questions: list[str]) -> list[str]: ...


class Judge(Protocol):
    """Beaver-Guard-V: judges requests and answers."""

    def judge_queries(self, images: list[Image.Image], questions: list[str]) -> list[QueryVerdict]: ...

    def judge_answers(
        self, images: list[Image.Image], questions: list[str], answers: list[str]
    ) -> list[AnswerVerdict]: ...


Outcome = Literal["answered", "regenerated", "refused_query", "fallback_refusal"]


@dataclass
class Trace:
    """Everything the guardrail decided for one request."""

    question: str
    query: QueryVerdict
    answer: str = ""
    outcome: Outcome = "answered"
    rounds_used: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)  # answer + verdict per attempt

    @property
    def initial_unsafe(self) -> bool:
        """The policy's first answer was judged unsafe (False when no answer was generated)."""
        return bool(self.attempts) and not self.attempts[0]["verdict"]["safe"]

    @property
    def final_unsafe(self) -> bool:
        """What the user finally gets is judged unsafe (refusals are safe by construction)."""
        if self.outcome in ("refused_query", "fallback_refusal"):
            return False
        return not self.attempts[-1]["verdict"]["safe"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"initial_unsafe": self.initial_unsafe, "final_unsafe": self.final_unsafe}


class Guardrail:
    """Runs the three levels over batches; `rounds=0` is moderation without re-generation."""

    def __init__(
        self,
        policy: Generator,
        guard: Judge,
        *,
        rounds: int = 5,
        refuse_severities: Sequence[Severity] = ("severe",),
        instruction: str = SAFETY_INSTRUCTION,
        refusal: str = REFUSAL,
    ) -> None:
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.policy = policy
        self.guard = guard
        self.rounds = rounds
        self.refuse_severities = frozenset(refuse_severities)
        self.instruction = instruction
        self.refusal = refusal

    def run(
        self, images: list[Image.Image], questions: list[str], first_answers: list[str] | None = None
    ) -> list[Trace]:
        """Guarded answers for a batch of requests, one trace each.

        `first_answers` are the policy's own answers when the caller already has them (evaluation
        scores the policy alone and behind the guardrail on the same samples); round 0 then judges
        them instead of sampling new ones.
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        if first_answers is not None and len(first_answers) != len(questions):
            raise ValueError(f"got {len(first_answers)} first answers for {len(questions)} questions")
        for i, question in enumerate(questions):
            if not question.strip():
                raise ValueError(f"request {i} has an empty question")
        verdicts = self.guard.judge_queries(images, questions)
        traces = [Trace(question=q, query=v) for q, v in zip(questions, verdicts, strict=True)]
        answerable = []
        for i, trace in enumerate(traces):
            if trace.query.severity in self.refuse_severities:
                trace.outcome, trace.answer = "refused_query", self.refusal
            else:
                answerable.append(i)
        pending = answerable
        for round_no in range(self.rounds + 1):
            if not pending:
                break
            given = [first_answers[i] for i in pending] if round_no == 0 and first_answers else None
            self._attempt(images, traces, pending, round_no, given)
            pending = [i for i in pending if not traces[i].attempts[-1]["verdict"]["safe"]]
        for i in answerable:
            trace = traces[i]
            if trace.attempts[-1]["verdict"]["safe"]:
                trace.answer = trace.attempts[-1]["answer"]
                trace.outcome = "answered" if trace.rounds_used == 0 else "regenerated"
            else:
                trace.outcome, trace.answer = "fallback_refusal", self.refusal
        return traces

    def _attempt(
        self,
        images: list[Image.Image],
        traces: list[Trace],
        which: list[int],
        round_no: int,
        answers: list[str] | None = None,
    ) -> None:
        """Generate (with the safety instruction after round 0) and judge the answers of `which`."""
        chosen_images = [images[i] for i in which]
        asked = [traces[i].question for i in which]
        if answers is None:
            prompts = asked if round_no == 0 else [f"{self.instruction} {q}" for q in asked]
            answers = self.policy.generate(chosen_images, prompts)
        verdicts = self.guard.judge_answers(chosen_images, asked, answers)
        for i, answer, verdict in zip(which, answers, verdicts, strict=True):
            traces[i].attempts.append({"round": round_no, "answer": answer, "verdict": asdict(verdict)})
            traces[i].rounds_used = round_no


def answer_within(trace: Trace, rounds: int, refusal: str = REFUSAL) -> tuple[str, bool]:
    """(answer, refused): what the user gets from a guardrail allowed `rounds` re-generations.

    One run with the largest budget holds every smaller budget's outcome in its attempts, so the
    evaluation reads rounds 0..R off one trace instead of running the guardrail R + 1 times.
    """
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    for attempt in trace.attempts:
        if attempt["round"] <= rounds and attempt["verdict"]["safe"]:
            return attempt["answer"], False
    return refusal, True


def summarize(traces: list[Trace], rounds: int) -> dict[str, Any]:
    """Guard-judged unsafe rate of the policy alone and after each level, outcomes, rounds used.

    `unsafe_rate_policy` is over the requests the policy answered (level 1 refuses severe ones
    without generating); the after-level rates are over all requests, counting refusals as safe.
    """
    n = len(traces)
    if n == 0:
        raise ValueError("no traces to summarize")
    answered = [t for t in traces if t.attempts]
    return {
        "requests": n,
        "rounds": rounds,
        "unsafe_rate_policy": sum(t.initial_unsafe for t in answered) / len(answered) if answered else 0.0,
        "refused_queries": sum(t.outcome == "refused_query" for t in traces),
        "unsafe_rate_after_level_1": sum(t.initial_unsafe for t in traces) / n,
        "unsafe_rate_after_level_3": sum(t.final_unsafe for t in traces) / n,
        "outcomes": dict(Counter(t.outcome for t in traces)),
        "rounds_used": {str(k): v for k, v in sorted(Counter(t.rounds_used for t in answered).items())},
    }
