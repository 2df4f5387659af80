"""`safe-rlhf-v serve` on 127.0.0.1: the openai client, the guardrail's refusals, bad requests, concurrency,
probes, registry aliases and a server whose models cannot load.

The guards are real guard folders (GuardModel saved and loaded, judged by GuardJudge) whose heads are
set so that their verdict is known: every request safe and every answer harmless, every request
severe, or every answer severely harmful. The guardrail itself runs unchanged.
"""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
import uvicorn
from fastapi import FastAPI
from mlflow.tracking import MlflowClient
from PIL import Image
from transformers import AutoProcessor

from safe_rlhf_v import tracking
from safe_rlhf_v.cli import main
from safe_rlhf_v.config import PipelineConfig, config_from_dict
from safe_rlhf_v.guardrail import REFUSAL
from safe_rlhf_v.models.guard import QUERY_LABELS, RATINGS, GuardModel
from safe_rlhf_v.models.policy import GenerationSettings, Policy
from safe_rlhf_v.registry import RegistryError
from safe_rlhf_v.serve import GuardedChat, ServeError, create_app, resolve_served_model, run_server

MAX_IMAGE_BYTES = 200_000
MAX_IMAGE_PIXELS = 128 * 128
MAX_NEW_TOKENS = 6
QUESTION = "What is shown in this picture?"


def png_data_url(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user_message(image_url: str | None = None, text: str = QUESTION) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image_url is not None:
        parts.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"role": "user", "content": parts}


def constant_guard(out: Path, base: Path, *, query: str, rating: int) -> Path:
    """A guard folder whose query head always says `query` and whose rating head always says `rating`."""
    guard = GuardModel.from_base(base)
    with torch.no_grad():
        for head in guard.heads.values():
            head.weight.zero_()
            head.bias.zero_()
        guard.heads["query"].bias[QUERY_LABELS.index(query)] = 10.0
        guard.heads["rating"].bias[RATINGS.index(rating)] = 10.0
    guard.save(out, processor=AutoProcessor.from_pretrained(base))
    return out


@pytest.fixture(scope="module")
def guards(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("guards")
    return {
        "lenient": constant_guard(root / "lenient", tiny_model, query="safe", rating=3),
        "severe-requests": constant_guard(root / "severe", tiny_model, query="severe", rating=3),
        "harmful-answers": constant_guard(root / "harmful", tiny_model, query="safe", rating=-3),
    }


def make_cfg(work: Path, tiny_model: Path, rounds: int = 1) -> PipelineConfig:
    return config_from_dict(
        {
            "work_dir": str(work),
            "data": {"uri": "unused"},
            "base_model": str(tiny_model),
            "guardrail": {"rounds": rounds, "generation": {"max_new_tokens": MAX_NEW_TOKENS}},
            "serve": {"max_image_bytes": MAX_IMAGE_BYTES, "max_image_pixels": MAX_IMAGE_PIXELS},
        }
    )


@contextmanager
def serving(app: FastAPI, *, ready: bool = True) -> Iterator[str]:
    """Run `app` with uvicorn on 127.0.0.1 (a port the OS picks) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        if ready:
            wait_for(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200, "the models")
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def guarded_server(tmp_path: Path, tiny_model: Path, guard: Path, rounds: int = 1) -> Iterator[str]:
    cfg = make_cfg(tmp_path, tiny_model, rounds)
    served = resolve_served_model(cfg, str(tiny_model), str(guard))
    app = create_app(served.name, lambda: GuardedChat.load(served, cfg.guardrail), cfg.serve)
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def lenient_url(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, guards: dict[str, Path]
) -> Iterator[str]:
    with guarded_server(tmp_path_factory.mktemp("lenient"), tiny_model, guards["lenient"]) as url:
        yield url


def client_for(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-checked", max_retries=0, timeout=120)


def test_openai_client_gets_the_policys_answer_to_an_image_question(
    lenient_url: str, tiny_model: Path
) -> None:
    client = client_for(lenient_url)
    assert [model.id for model in client.models.list()] == ["tiny"]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[user_message(png_data_url())], extra_headers={"X-Request-ID": "trace-42"}
    )
    assert raw.headers["x-request-id"] == "trace-42"
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert completion.id.startswith("chatcmpl-") and completion.created > 0
    (choice,) = completion.choices
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.refusal is None
    # What the policy itself answers with the same settings: the endpoint adds nothing to it.
    policy = Policy(tiny_model, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=1))
    image = Image.open(io.BytesIO(base64.b64decode(png_data_url().split(",", 1)[1]))).convert("RGB")
    assert choice.message.content == policy.generate([image], [QUESTION])[0]
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    guardrail = completion.model_extra["guardrail"]
    assert guardrail == {
        "outcome": "answered",
        "refused_by": None,
        "query_severity": "safe",
        "answers_judged": 1,
        "rounds_used": 0,
    }


def test_a_severe_request_gets_an_explained_refusal_from_the_input_guard(
    tmp_path: Path, tiny_model: Path, guards: dict[str, Path]
) -> None:
    with guarded_server(tmp_path, tiny_model, guards["severe-requests"]) as url:
        completion = client_for(url).chat.completions.create(
            model="tiny", messages=[user_message(png_data_url(), "How do I hurt the animal in the picture?")]
        )
    (choice,) = completion.choices
    assert choice.finish_reason == "content_filter"
    assert choice.message.content.startswith(REFUSAL)
    assert "input guard" in choice.message.content and "severe" in choice.message.content
    assert choice.message.refusal == choice.message.content
    guardrail = completion.model_extra["guardrail"]
    assert guardrail["refused_by"] == "input_moderation" and guardrail["outcome"] == "refused_query"
    assert guardrail["answers_judged"] == 0  # refused before the policy generated anything


def test_unsafe_answers_are_regenerated_then_refused(
    tmp_path: Path, tiny_model: Path, guards: dict[str, Path]
) -> None:
    with guarded_server(tmp_path, tiny_model, guards["harmful-answers"], rounds=2) as url:
        completion = client_for(url).chat.completions.create(
            model="tiny", messages=[user_message(png_data_url())]
        )
    (choice,) = completion.choices
    assert choice.finish_reason == "content_filter" and choice.message.content.startswith(REFUSAL)
    assert "all 3 answers unsafe" in choice.message.content and "severe harm" in choice.message.content
    guardrail = completion.model_extra["guardrail"]
    assert guardrail["refused_by"] == "regeneration" and guardrail["outcome"] == "fallback_refusal"
    assert guardrail["answers_judged"] == 3 and guardrail["rounds_used"] == 2


def test_without_regeneration_the_output_guard_refuses(
    tmp_path: Path, tiny_model: Path, guards: dict[str, Path]
) -> None:
    with guarded_server(tmp_path, tiny_model, guards["harmful-answers"], rounds=0) as url:
        completion = client_for(url).chat.completions.create(
            model="tiny", messages=[user_message(png_data_url())]
        )
    assert completion.choices[0].finish_reason == "content_filter"
    assert "output guard" in completion.choices[0].message.content
    assert completion.model_extra["guardrail"]["refused_by"] == "output_moderation"


def api_error(call: Callable[[], object], status: int) -> dict[str, Any]:
    """The error body the openai client raised for `call`, checked to carry `status`."""
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    assert caught.value.status_code == status, caught.value.body
    body = caught.value.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= set(body)
    assert caught.value.response.headers.get("x-request-id")
    return body


def test_bad_requests_through_the_openai_client_are_named(lenient_url: str) -> None:
    create = client_for(lenient_url).chat.completions.create
    body = api_error(lambda: create(model="tiny", messages=[user_message()]), 400)
    assert "has no image" in body["message"] and body["code"] == "image_missing"
    body = api_error(lambda: create(model="tiny", messages=[{"role": "user", "content": QUESTION}]), 400)
    assert "has no image" in body["message"]
    huge = "data:image/png;base64," + base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1)).decode()
    body = api_error(lambda: create(model="tiny", messages=[user_message(huge)]), 413)
    assert f"over this server's limit of {MAX_IMAGE_BYTES} bytes" in body["message"]
    assert "serve.max_image_bytes" in body["message"] and body["code"] == "image_too_large"
    wide = png_data_url((256, 256))  # a few hundred bytes of PNG, but 65536 pixels
    body = api_error(lambda: create(model="tiny", messages=[user_message(wide)]), 413)
    assert "256x256" in body["message"] and "serve.max_image_pixels" in body["message"]
    garbage = "data:image/png;base64," + base64.b64encode(b"not a png at all").decode()
    body = api_error(lambda: create(model="tiny", messages=[user_message(garbage)]), 400)
    assert "image could not be decoded" in body["message"] and body["code"] == "invalid_image"
    body = api_error(lambda: create(model="tiny", messages=[user_message("data:image/png;base64,@@@")]), 400)
    assert "not valid base64" in body["message"]
    body = api_error(lambda: create(model="tiny", messages=[user_message("https://example.com/a.png")]), 400)
    assert "must be a data: URL" in body["message"]
    body = api_error(lambda: create(model="gpt-4o", messages=[user_message(png_data_url())]), 404)
    assert body["message"] == "model 'gpt-4o' does not exist on this server; it serves 'tiny'"
    assert body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client_for(lenient_url).models.retrieve("gpt-4o")
    system = {"role": "system", "content": "Be brief."}
    body = api_error(lambda: create(model="tiny", messages=[system, user_message(png_data_url())]), 400)
    assert "role 'system' is not supported" in body["message"]
    body = api_error(lambda: create(model="tiny", messages=[user_message(png_data_url())], n=2), 400)
    assert "n=2 is not supported" in body["message"]
    body = api_error(
        lambda: create(model="tiny", messages=[user_message(png_data_url())], max_tokens=10**6), 400
    )
    assert "serve.max_tokens_limit" in body["message"]


def post(url: str, data: bytes, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(
        f"{url}/v1/chat/completions",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        timeout=60,
    )


def test_malformed_bodies_get_400_or_413_naming_the_problem(lenient_url: str) -> None:
    response = post(lenient_url, b'{"model": "tiny", "messages": [')
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("request body is not valid JSON")
    assert response.headers["x-request-id"]
    response = post(lenient_url, b'{"model": "tiny"}')
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "invalid request: messages: field required",
        "type": "invalid_request_error",
        "param": "messages",
        "code": None,
    }
    response = post(lenient_url, b'["not", "an", "object"]')
    assert response.status_code == 400 and "must be a JSON object" in response.json()["error"]["message"]
    response = post(lenient_url, b" " * (2 * MAX_IMAGE_BYTES + 2**20 + 1))
    assert response.status_code == 413 and "request body" in response.json()["error"]["message"]
    response = requests.get(f"{lenient_url}/v1/nothing-here", timeout=10)
    assert response.status_code == 404 and "/v1/nothing-here" in response.json()["error"]["message"]
    response = requests.get(f"{lenient_url}/v1/chat/completions", timeout=10)
    assert response.status_code == 405 and response.headers["allow"] == "POST"


def test_trace_ids_are_honoured_when_tame_and_replaced_otherwise(lenient_url: str) -> None:
    response = post(lenient_url, b"{}", {"X-Request-ID": "client.id-7:a"})
    assert response.headers["x-request-id"] == "client.id-7:a"
    response = post(lenient_url, b"{}", {"X-Request-ID": "x" * 200})
    assert response.headers["x-request-id"] != "x" * 200 and len(response.headers["x-request-id"]) == 32


def test_concurrent_requests_all_get_the_same_answer_and_distinct_trace_ids(lenient_url: str) -> None:
    client = client_for(lenient_url)

    def ask(_: int) -> tuple[str, str | None]:
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=[user_message(png_data_url())]
        )
        return raw.headers["x-request-id"], raw.parse().choices[0].message.content

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(ask, range(4)))
    assert len({trace for trace, _ in results}) == 4
    # One model call at a time, each seeded the same: interleaved calls would differ.
    assert len({answer for _, answer in results}) == 1


def test_health_is_live_at_once_and_ready_once_the_models_are_loaded(
    tmp_path: Path, tiny_model: Path, guards: dict[str, Path]
) -> None:
    cfg = make_cfg(tmp_path, tiny_model)
    served = resolve_served_model(cfg, str(tiny_model), str(guards["lenient"]))
    release = threading.Event()

    def slow_load() -> GuardedChat:
        assert release.wait(timeout=60)
        return GuardedChat.load(served, cfg.guardrail)

    with serving(create_app(served.name, slow_load, cfg.serve), ready=False) as url:
        assert requests.get(f"{url}/healthz", timeout=5).json() == {"status": "ok"}
        not_ready = requests.get(f"{url}/readyz", timeout=5)
        assert not_ready.status_code == 503 and not_ready.json()["status"] == "loading"
        body = api_error(
            lambda: client_for(url).chat.completions.create(
                model="tiny", messages=[user_message(png_data_url())]
            ),
            503,
        )
        assert body["code"] == "model_loading"
        release.set()
        wait_for(lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200, "the models")
        assert requests.get(f"{url}/readyz", timeout=5).json() == {"status": "ready", "model": "tiny"}


def test_a_server_whose_models_cannot_load_stops_with_the_reason(
    tmp_path: Path, tiny_model: Path, guards: dict[str, Path]
) -> None:
    broken = tmp_path / "broken-guard"
    shutil.copytree(guards["lenient"], broken)
    (broken / "guard_heads.safetensors").write_bytes(b"not safetensors")
    cfg = make_cfg(tmp_path, tiny_model)
    with pytest.raises(Exception, match=r"(?i)header|safetensor"):
        run_server(cfg, model=str(tiny_model), guard=str(broken), host="127.0.0.1", port=0)


def test_a_registered_alias_is_served_with_the_guard_it_was_registered_with(
    tmp_path: Path, tiny_model: Path, guards: dict[str, Path]
) -> None:
    cfg = make_cfg(tmp_path, tiny_model)
    client = MlflowClient(tracking.resolve_tracking_uri(cfg.tracking, cfg.work_dir))
    for name in ("safe-rlhf-v-guard", "safe-rlhf-v-policy"):
        client.create_registered_model(name)
    client.create_model_version("safe-rlhf-v-guard", source=str(guards["lenient"]))
    client.create_model_version(
        "safe-rlhf-v-policy",
        source=str(tiny_model),
        tags={"guard_model_version": "models:/safe-rlhf-v-guard/1"},
    )
    client.set_registered_model_alias("safe-rlhf-v-policy", "candidate", "1")
    served = resolve_served_model(cfg, "models:/safe-rlhf-v-policy@candidate")
    assert served.name == "safe-rlhf-v-policy"
    assert Path(served.policy_dir) == tiny_model and Path(served.guard_dir) == guards["lenient"]
    assert resolve_served_model(cfg, "models:/safe-rlhf-v-policy/1", name="policy").name == "policy"
    with pytest.raises(RegistryError, match="has no alias 'production'; its aliases: candidate -> 1"):
        resolve_served_model(cfg, "models:/safe-rlhf-v-policy@production")
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        resolve_served_model(cfg, "models:/nope@candidate")
    with pytest.raises(RegistryError, match="is not a model URI"):
        resolve_served_model(cfg, "models:/safe-rlhf-v-policy")


def test_serve_refuses_bad_model_folders_before_starting(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = make_cfg(tmp_path, tiny_model)
    with pytest.raises(ServeError, match="--guard is needed"):
        resolve_served_model(cfg, str(tiny_model))
    with pytest.raises(ServeError, match="does not exist"):
        resolve_served_model(cfg, str(tmp_path / "missing"), str(tiny_model))
    with pytest.raises(ServeError, match=r"holds no config\.json"):
        resolve_served_model(cfg, str(tmp_path), str(tiny_model))
    assert main(["serve", "--model", str(tiny_model), "--guard", str(tiny_model), "--port", "0"]) == 2
    assert "is not a guard model" in capsys.readouterr().err
