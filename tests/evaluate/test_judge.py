"""The external-judge protocol against a scripted OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from safe_rlhf_v.config import JudgeConfig
from safe_rlhf_v.evaluate.judge import PairwiseJudge, judge_records, parse_choice

KEY_ENV = "TEST_JUDGE_KEY"
Responder = Callable[[dict[str, Any]], tuple[int, str]]


class JudgeServer:
    """A `/v1/chat/completions` endpoint whose replies a test scripts; it records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.responder: Responder = lambda body: (200, '{"better": "tie"}')
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._http.judge = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        server: JudgeServer = self.server.judge  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"authorization": self.headers.get("Authorization"), "body": body})
        status, content = server.responder(body)
        completion = {
            "id": f"chatcmpl-{len(server.requests)}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        payload = json.dumps(completion if status == 200 else {"error": {"message": content}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


def user_text(body: dict[str, Any]) -> str:
    parts = body["messages"][1]["content"]
    return next(part["text"] for part in parts if part["type"] == "text")


def shown_answers(body: dict[str, Any]) -> tuple[str, str]:
    """The answers in positions A and B of one request."""
    text = user_text(body)
    first = re.search(r"\[Answer A\]\n(.*)\n\[End of answer A\]", text, re.S)
    second = re.search(r"\[Answer B\]\n(.*)\n\[End of answer B\]", text, re.S)
    assert first and second, text
    return first.group(1), second.group(1)


def fair(body: dict[str, Any]) -> tuple[int, str]:
    """A judge that picks whichever position holds the answer marked GOOD."""
    a, b = shown_answers(body)
    better = "A" if "GOOD" in a else "B" if "GOOD" in b else "tie"
    return 200, json.dumps({"better": better})


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    judge_server = JudgeServer()
    yield judge_server
    judge_server.close()


def judge_config(server: JudgeServer, concurrency: int) -> JudgeConfig:
    return JudgeConfig(
        base_url=server.url,
        model="judge-test",
        api_key_env=KEY_ENV,
        max_retries=0,
        timeout_s=5.0,
        concurrency=concurrency,
    )


@pytest.fixture
def judge(server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> PairwiseJudge:
    """One prompt at a time, so tests can read the requests in order."""
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    return PairwiseJudge(judge_config(server, concurrency=1))


def test_parse_choice_accepts_only_the_asked_json() -> None:
    assert parse_choice('{"better": "A"}') == "A"
    assert parse_choice(' {"better":"tie"}\n') == "tie"
    for reply in (
        None,
        "A",
        '{"better": "a"}',
        '{"better": "A", "why": "x"}',
        '```json\n{"better": "B"}\n```',
    ):
        assert parse_choice(reply) is None, reply


def test_position_biased_judge_yields_ties_not_wins(
    server: JudgeServer, judge: PairwiseJudge, records: list[dict[str, Any]]
) -> None:
    server.responder = lambda body: (200, '{"better": "A"}')
    verdict = judge_records(judge, records[:2], aspects=("helpfulness",))
    assert verdict == {"helpfulness": {"win": 0.0, "tie": 1.0, "loss": 0.0, "n": 2, "malformed": 0}}
    shown = [shown_answers(request["body"]) for request in server.requests]
    trained, initial = records[0]["trained"]["answer"], records[0]["initial"]["answer"]
    assert shown[:2] == [(trained, initial), (initial, trained)]


def test_agreement_in_both_orders_is_a_win_or_a_loss(
    server: JudgeServer, judge: PairwiseJudge, records: list[dict[str, Any]]
) -> None:
    server.responder = fair
    records[0]["trained"]["answer"] += " GOOD"
    records[1]["initial"]["answer"] += " GOOD"
    records[2]["trained"]["answer"] += " GOOD"
    verdict = judge_records(judge, records[:4], aspects=("harmlessness",))["harmlessness"]
    assert verdict == {"win": 0.5, "tie": 0.25, "loss": 0.25, "n": 4, "malformed": 0}
    assert len(server.requests) == 8
    assert "Which answer is safer" in user_text(server.requests[0]["body"])


def test_malformed_replies_are_reasked_once_then_counted(
    server: JudgeServer, judge: PairwiseJudge, records: list[dict[str, Any]]
) -> None:
    def rambling_on_question_1(body: dict[str, Any]) -> tuple[int, str]:
        return (200, "Answer A, clearly.") if "question 1 of" in user_text(body) else fair(body)

    server.responder = rambling_on_question_1
    records[0]["trained"]["answer"] += " GOOD"
    verdict = judge_records(judge, records[:2], aspects=("helpfulness",))["helpfulness"]
    assert verdict == {"win": 1.0, "tie": 0.0, "loss": 0.0, "n": 1, "malformed": 1}
    asked_about_1 = [r for r in server.requests if "question 1 of" in user_text(r["body"])]
    assert len(asked_about_1) == 2  # the first order and its one re-ask; the swapped order is moot


def test_a_reask_recovers_from_one_malformed_reply(
    server: JudgeServer, judge: PairwiseJudge, records: list[dict[str, Any]]
) -> None:
    replies = iter([(200, "I prefer B")])
    server.responder = lambda body: next(replies, None) or fair(body)
    records[0]["initial"]["answer"] += " GOOD"
    verdict = judge_records(judge, records[:1], aspects=("helpfulness",))["helpfulness"]
    assert verdict == {"win": 0.0, "tie": 0.0, "loss": 1.0, "n": 1, "malformed": 0}
    assert len(server.requests) == 3


def test_everything_malformed_leaves_rates_undefined(
    server: JudgeServer, judge: PairwiseJudge, records: list[dict[str, Any]]
) -> None:
    server.responder = lambda body: (200, "")
    verdict = judge_records(judge, records[:1], aspects=("helpfulness",))["helpfulness"]
    assert verdict == {"win": None, "tie": None, "loss": None, "n": 0, "malformed": 1}


def test_request_carries_key_model_image_and_question(
    server: JudgeServer, judge: PairwiseJudge, records: list[dict[str, Any]]
) -> None:
    judge_records(judge, records[:2], aspects=("helpfulness",))
    first = server.requests[0]
    assert first["authorization"] == "Bearer sk-test-123"
    body = first["body"]
    assert body["model"] == "judge-test"
    assert body["messages"][0]["role"] == "system"
    parts = body["messages"][1]["content"]
    assert parts[0] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{records[0]['image_png']}"},
    }
    assert "User request: question 0 of evaluation?" in parts[1]["text"]
    assert "Which answer is more helpful" in parts[1]["text"]
    without_image = server.requests[2]["body"]["messages"][1]["content"]
    assert [part["type"] for part in without_image] == ["text"]


def test_missing_key_variable_is_named(server: JudgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    cfg = JudgeConfig(base_url=server.url, model="judge-test", api_key_env="NO_SUCH_JUDGE_KEY")
    with pytest.raises(
        ValueError, match="environment variable NO_SUCH_JUDGE_KEY holding its API key is not set"
    ):
        PairwiseJudge(cfg)


def test_server_errors_name_the_endpoint(
    server: JudgeServer, judge: PairwiseJudge, records: list[dict[str, Any]]
) -> None:
    server.responder = lambda body: (500, "overloaded")
    with pytest.raises(
        RuntimeError, match=rf"external judge at {re.escape(server.url)} \(model judge-test\)"
    ):
        judge_records(judge, records[:1])


def test_prompts_are_judged_concurrently_with_the_same_counts(
    server: JudgeServer, monkeypatch: pytest.MonkeyPatch, records: list[dict[str, Any]]
) -> None:
    lock = threading.Lock()
    in_flight = {"now": 0, "peak": 0}

    def slow_fair(body: dict[str, Any]) -> tuple[int, str]:
        with lock:
            in_flight["now"] += 1
            in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
        time.sleep(0.05)
        with lock:
            in_flight["now"] -= 1
        return fair(body)

    server.responder = slow_fair
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    records[0]["trained"]["answer"] += " GOOD"
    records[1]["initial"]["answer"] += " GOOD"
    verdicts, peaks = {}, {}
    for concurrency in (1, 4):
        in_flight["peak"] = 0
        verdicts[concurrency] = judge_records(PairwiseJudge(judge_config(server, concurrency)), records)
        peaks[concurrency] = in_flight["peak"]
    n = len(records)  # one win, one loss, the rest ties
    expected = {"win": 1 / n, "tie": (n - 2) / n, "loss": 1 / n, "n": n, "malformed": 0}
    assert verdicts[1] == verdicts[4] == {"helpfulness": expected, "harmlessness": expected}
    assert peaks[1] == 1
    assert 2 <= peaks[4] <= 4
    assert len(server.requests) == 2 * 2 * 2 * len(records)  # two runs, two aspects, two orders
