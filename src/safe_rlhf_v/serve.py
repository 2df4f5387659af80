"""`safe-rlhf-v serve`: the policy behind the multi-level guardrail as an OpenAI-compatible endpoint.

The paper's guardrail is a deployment-time defence, so it belongs in front of the served model, not
only in the batch `guarded-generate`. Routes:

- `POST /v1/chat/completions`: one user message with one image (a `data:` URL) and text parts, answered
  through :class:`safe_rlhf_v.guardrail.Guardrail` (input moderation, output moderation,
  re-generation rounds, an explained refusal) in the OpenAI `chat.completion` shape. A refusal is a
  normal completion whose content explains it, with `finish_reason: "content_filter"`; every answer
  carries a `guardrail` field saying what the guardrail did and which level refused, if any.
- `GET /v1/models`, `GET /v1/models/{id}`: the one model served.
- `GET /healthz` (the process answers) and `GET /readyz` (the policy and guard are loaded).

Models load in a background thread after the server starts, so a Kubernetes liveness probe passes
while a 7B model loads and the readiness probe holds traffic back until it is ready. The models are
called one request at a time under a lock (a GPU runs one generation at a time anyway, and neither
the policy's seeding nor a tokenizer is safe to share between threads); requests wait in worker
threads, so the event loop keeps answering probes and rejecting bad requests meanwhile.

Every request gets a trace id: a well-formed incoming `X-Request-ID`, else a new one. It comes back
in the `X-Request-ID` header of every response, errors included, and in the one log line per
request; prompts and answers are never logged.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from safe_rlhf_v.config import GuardrailConfig, PipelineConfig, ServeConfig
from safe_rlhf_v.data.collate import render_prompt
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.guardrail import Guardrail, Trace
from safe_rlhf_v.models.guard import read_guard_config
from safe_rlhf_v.models.judge import GuardJudge
from safe_rlhf_v.models.policy import GenerationSettings, Policy

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

REGISTRY_SCHEME = "models:/"
TRACE_HEADER = "X-Request-ID"
_TRACE_ID_RE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
"""An incoming trace id is echoed and logged only if it is this tame: no log or header injection."""
_DATA_URL_RE = re.compile(r"data:(?P<mime>[\w.+\-]+/[\w.+\-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.S)
_BODY_SLACK_BYTES = 2**20
_NO_IMAGE = (
    "messages[0] has no image: this model answers questions about an image; add a part "
    "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}"
)

RefusalLevel = Literal["input_moderation", "output_moderation", "regeneration"]


class ServeError(UserError, ValueError):
    """The serving setup is wrong (a model that cannot be found or is not what it should be)."""


class APIError(Exception):
    """A request the server answers with an OpenAI-style error body; `message` names the problem."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ------------------------------------------------------------------------------ what is served


@dataclass(frozen=True)
class ServedModel:
    """What one server answers for: the model id clients send and the local folders to load."""

    name: str
    policy_dir: str
    guard_dir: str


def _local_folder(uri: str, role: str, cfg: PipelineConfig) -> str:
    """A model folder on this machine: `s3://` prefixes are downloaded once (into the work dir)."""
    from safe_rlhf_v.stages.context import local_model

    folder = local_model(uri, cfg.work_dir)
    if not Path(folder).is_dir():
        raise ServeError(
            f"{role} {uri} is neither a model folder nor a models:/ URI: {folder} does not exist"
        )
    if not (Path(folder) / "config.json").is_file():
        raise ServeError(f"{role} {uri} is not a model folder: {folder} holds no config.json")
    return folder


def _registered_source(cfg: PipelineConfig, uri: str, role: str) -> tuple[str, ModelVersion]:
    """The source of the registered version a `models:/` URI names, and the version itself."""
    from safe_rlhf_v import registry

    version = registry.resolve_version(cfg, uri)
    folder = registry.folder_of(version)
    log.info("%s %s is %s version %s at %s", role, uri, version.name, version.version, folder)
    return folder, version


def resolve_served_model(
    cfg: PipelineConfig, model: str, guard: str | None = None, name: str | None = None
) -> ServedModel:
    """Find the policy and guard folders and check them before anything heavy loads.

    `model` and `guard` are folders, `s3://` prefixes or registry URIs (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`). Without `guard`, a registered policy is served with the guard version it
    was registered and evaluated with. The model id clients send defaults to the registered name,
    else the folder's name.
    """
    from safe_rlhf_v import registry

    policy_source, default_name, version = model, Path(model.rstrip("/")).name, None
    if model.startswith(REGISTRY_SCHEME):
        policy_source, version = _registered_source(cfg, model, "policy")
        default_name = version.name
    if guard is None:
        if version is None:
            raise ServeError(
                f"--guard is needed: only a registered policy (models:/...) names its guard, not {model}"
            )
        guard = registry.upstream_version_uri(version, "guard")
        if guard is None:
            raise ServeError(f"{model} carries no guard version tag: pass --guard")
        log.info("guard: %s, the one the policy was registered with", guard)
    guard_source = _registered_source(cfg, guard, "guard")[0] if guard.startswith(REGISTRY_SCHEME) else guard
    policy_dir = _local_folder(policy_source, "policy", cfg)
    guard_dir = _local_folder(guard_source, "guard", cfg)
    read_guard_config(Path(guard_dir))  # a clear error now for a folder that is no guard
    return ServedModel(name=name or default_name, policy_dir=policy_dir, guard_dir=guard_dir)


# ------------------------------------------------------------------------------- the guardrail


@dataclass(frozen=True)
class GuardedAnswer:
    """What one request got: the guardrail's trace, what the client reads, and token counts."""

    trace: Trace
    content: str
    refused_by: RefusalLevel | None
    prompt_tokens: int
    completion_tokens: int


class GuardedChat:
    """The loaded policy and guard, called by one request at a time.

    The guardrail logic is :class:`Guardrail`'s; this adds the per-request decoding settings, the
    refusal's explanation and the token counts the OpenAI response shape reports.
    """

    def __init__(self, policy: Policy, guard: GuardJudge, settings: GuardrailConfig) -> None:
        self.policy = policy
        self.guard = guard
        self.settings = settings
        self.defaults = GenerationSettings.from_config(settings.generation, batch_size=1)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, served: ServedModel, settings: GuardrailConfig) -> GuardedChat:
        """Load both models (minutes for a 7B policy), logging each step."""
        started = time.perf_counter()
        log.info("loading policy from %s", served.policy_dir)
        policy = Policy(served.policy_dir)
        log.info("loading guard from %s", served.guard_dir)
        guard = GuardJudge(served.guard_dir, batch_size=1)
        log.info("policy and guard loaded in %.1f s on %s", time.perf_counter() - started, policy.device)
        return cls(policy, guard, settings)

    def answer(
        self,
        image: Image.Image,
        question: str,
        *,
        max_tokens: int | None,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
    ) -> GuardedAnswer:
        """Run the guardrail on one request; blocks while another request holds the models."""
        chosen = replace(
            self.defaults,
            max_new_tokens=max_tokens or self.defaults.max_new_tokens,
            temperature=self.defaults.temperature if temperature is None else temperature,
            top_p=self.defaults.top_p if top_p is None else top_p,
            seed=self.defaults.seed if seed is None else seed,
        )
        guardrail = Guardrail(
            self.policy,
            self.guard,
            rounds=self.settings.rounds,
            refuse_severities=self.settings.refuse_severities,
        )
        with self._lock:
            self.policy.settings = chosen
            (trace,) = guardrail.run([image], [question])
            refused_by = refusal_level(trace, self.settings.rounds)
            content = trace.answer if refused_by is None else f"{trace.answer}\n\n{explain_refusal(trace)}"
            tokenizer = self.policy.processor.tokenizer
            prompt_tokens = len(tokenizer(render_prompt(self.policy.processor, question))["input_ids"])
            completion_tokens = len(tokenizer(content, add_special_tokens=False)["input_ids"])
        return GuardedAnswer(trace, content, refused_by, prompt_tokens, completion_tokens)


def refusal_level(trace: Trace, rounds: int) -> RefusalLevel | None:
    """Which level of the guardrail refused (None: the client gets the policy's answer).

    Level 1 refuses a request before generating; an unsafe answer is refused by level 2 when there is
    no re-generation (`rounds == 0`), else by level 3 once every re-generation was unsafe too.
    """
    if trace.outcome == "refused_query":
        return "input_moderation"
    if trace.outcome == "fallback_refusal":
        return "output_moderation" if rounds == 0 else "regeneration"
    return None


def explain_refusal(trace: Trace) -> str:
    """One sentence a person can read: what the guard saw that made the guardrail refuse."""
    if trace.outcome == "refused_query":
        return (
            f"(Refused by the input guard: it rated this request {trace.query.severity}, "
            "which this server refuses without answering.)"
        )
    last = trace.attempts[-1]["verdict"]
    judged = f"{last['severity']} harm, category {last['category']}"
    if len(trace.attempts) == 1:
        return f"(Refused by the output guard: it judged the answer unsafe: {judged}.)"
    return (
        f"(Refused after re-generation: the output guard judged all {len(trace.attempts)} answers unsafe, "
        f"the last one {judged}.)"
    )


# ----------------------------------------------------------------------------------- requests


class ChatRequest(BaseModel):
    """The OpenAI chat-completions fields this server reads; others are accepted and ignored, as
    clients send many (user, frequency_penalty, ...) that mean nothing to this model."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    seed: int | None = None


def _validation_message(error: ValidationError) -> str:
    """pydantic's errors as `field: problem` (the first few), which is what a client needs to fix."""
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        parts.append(f"{where}: {item['msg'].lower()}")
    return "invalid request: " + "; ".join(parts)


def parse_request(body: bytes) -> ChatRequest:
    """The request body as a `ChatRequest`, or a 400 naming what is malformed or missing."""
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(raw).__name__}")
    try:
        request = ChatRequest.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]["loc"]
        raise APIError(400, _validation_message(error), param=str(first[0]) if first else None) from None
    if request.stream:
        raise APIError(
            400,
            "stream=true is not supported: the guardrail judges a whole answer before it is sent",
            param="stream",
        )
    if request.n != 1:
        raise APIError(400, f"n={request.n} is not supported: one answer per request", param="n")
    return request


@dataclass(frozen=True)
class UserTurn:
    """The one user message of a request: its encoded image and its question."""

    image_url: str
    question: str


def user_turn(messages: list[dict[str, Any]]) -> UserTurn:
    """The single user message's image and text; a 400 naming the message and part otherwise.

    The policy answers one image and one question (how it was trained), so system prompts and earlier
    turns are refused rather than silently dropped.
    """
    for i, message in enumerate(messages):
        role = message.get("role")
        if role != "user":
            raise APIError(
                400,
                f"messages[{i}]: role {role!r} is not supported: send one user message holding an image "
                "and a question (the policy answers single-turn requests)",
                param=f"messages[{i}].role",
            )
    if len(messages) != 1:
        raise APIError(
            400,
            f"send one user message, got {len(messages)}: the policy answers single-turn requests",
            param="messages",
        )
    content = messages[0].get("content")
    if isinstance(content, str) or content is None:
        raise APIError(400, _NO_IMAGE, param="messages[0].content", code="image_missing")
    if not isinstance(content, list):
        raise APIError(
            400,
            f"messages[0].content must be a string or a list of parts, got {type(content).__name__}",
            param="messages[0].content",
        )
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        where = f"messages[0].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif (
            kind == "image_url"
            and isinstance(part.get("image_url"), dict)
            and isinstance(part["image_url"].get("url"), str)
        ):
            images.append(part["image_url"]["url"])
        else:
            raise APIError(
                400,
                f"{where}: expected {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}, got {_preview(part)}",
                param=where,
            )
    if not images:
        raise APIError(400, _NO_IMAGE, param="messages[0].content", code="image_missing")
    if len(images) > 1:
        raise APIError(400, f"one image per request, got {len(images)}", param="messages[0].content")
    question = "\n".join(text.strip() for text in texts if text.strip())
    if not question:
        raise APIError(
            400,
            "messages[0] has no question: add a {'type': 'text'} part with one",
            param="messages[0].content",
        )
    return UserTurn(image_url=images[0], question=question)


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def decode_image(url: str, limits: ServeConfig) -> Image.Image:
    """The RGB image of a base64 `data:` URL; 400 if it is none, 413 if it is over the limits.

    The size is checked from the base64 length before decoding and the pixel count from the header
    before the bitmap is decompressed, so an oversized image costs no memory.
    """
    match = _DATA_URL_RE.fullmatch(url)
    if match is None:
        raise APIError(
            400,
            f"image_url must be a data: URL (data:image/png;base64,...), got {_preview(url)}: "
            "this server does not fetch images from the network",
            param="image_url",
            code="invalid_image",
        )
    mime = match["mime"] or "text/plain"
    if not mime.startswith("image/") or ";base64" not in match["params"]:
        raise APIError(
            400,
            f"image_url must be a base64 image (data:image/...;base64,...), got data:{mime}{match['params']}",
            param="image_url",
            code="invalid_image",
        )
    data = re.sub(r"\s+", "", match["data"])
    estimated = len(data) * 3 // 4 - data[-2:].count("=")
    if estimated > limits.max_image_bytes:
        raise _too_large(estimated, limits.max_image_bytes)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(
            400, f"image_url is not valid base64: {error}", param="image_url", code="invalid_image"
        ) from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            pixels = image.width * image.height
            if pixels > limits.max_image_pixels:
                raise APIError(
                    413,
                    f"image is {image.width}x{image.height} = {pixels} pixels, over this server's "
                    f"limit of {limits.max_image_pixels} (serve.max_image_pixels)",
                    param="image_url",
                    code="image_too_large",
                )
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise APIError(
            400,
            f"image could not be decoded ({mime}, {len(raw)} bytes): {error}",
            param="image_url",
            code="invalid_image",
        ) from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"image is {size} bytes, over this server's limit of {limit} bytes (serve.max_image_bytes)",
        param="image_url",
        code="image_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, stopping with 413 as soon as it passes `limit` (a declared or a streamed length)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"request body is {declared} bytes, over this server's limit of {limit}",
            code="request_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"request body is over this server's limit of {limit} bytes", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def trace_id(incoming: str | None) -> str:
    """The client's `X-Request-ID` when it is a tame token, else a fresh one."""
    if incoming and _TRACE_ID_RE.fullmatch(incoming):
        return incoming
    return uuid.uuid4().hex


# ---------------------------------------------------------------------------------------- app


def completion_body(model: str, answer: GuardedAnswer) -> dict[str, Any]:
    """The OpenAI `chat.completion` object, plus the `guardrail` field saying what happened."""
    trace = answer.trace
    refused = answer.refused_by is not None
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": answer.content,
                    "refusal": answer.content if refused else None,
                },
                "finish_reason": "content_filter" if refused else "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
        "guardrail": {
            "outcome": trace.outcome,
            "refused_by": answer.refused_by,
            "query_severity": trace.query.severity,
            "answers_judged": len(trace.attempts),
            "rounds_used": trace.rounds_used,
        },
    }


class _State:
    """What the routes share: the loaded models once ready, or why loading failed."""

    def __init__(self) -> None:
        self.chat: GuardedChat | None = None
        self.load_error: BaseException | None = None


def create_app(
    served_name: str,
    load: Callable[[], GuardedChat],
    limits: ServeConfig,
    *,
    on_load_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The FastAPI app; `load` runs in a background thread at startup (see the module docstring).

    `on_load_failure` lets the caller stop the server when the models cannot load: a server that
    will never be ready should exit with the reason, not wait for probes to give up on it.
    """
    state = _State()
    body_limit = 2 * limits.max_image_bytes + _BODY_SLACK_BYTES

    def load_models() -> None:
        try:
            state.chat = load()
        except Exception as error:  # any failure is reported, then the server stops
            log.exception("loading the models failed")
            state.load_error = error
            if on_load_failure is not None:
                on_load_failure(error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load_models, name="load-models", daemon=True).start()
        yield

    app = FastAPI(
        title="safe-rlhf-v", summary="Safe RLHF-V policy behind the multi-level guardrail", lifespan=lifespan
    )
    app.state.models = state

    @app.middleware("http")
    async def with_trace_id(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request.state.trace_id = trace_id(request.headers.get(TRACE_HEADER))
        request.state.outcome = None
        started = time.perf_counter()
        response = await call_next(request)
        response.headers[TRACE_HEADER] = request.state.trace_id
        if request.url.path.startswith("/v1/"):
            log.info(
                "trace=%s %s %s %d %.3fs%s",
                request.state.trace_id,
                request.method,
                request.url.path,
                response.status_code,
                time.perf_counter() - started,
                f" {request.state.outcome}" if request.state.outcome else "",
            )
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        request.state.outcome = f"error {error.code or error.kind}"  # the code, not the client's text
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        response = APIError(
            error.status_code, f"{request.method} {request.url.path}: {error.detail}"
        ).response()
        response.headers.update(error.headers or {})  # e.g. Allow on a 405
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves requests (the models may still be loading)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 200 once the policy and guard are loaded, 503 before (or if loading failed)."""
        if state.chat is not None:
            return JSONResponse({"status": "ready", "model": served_name})
        status = f"loading failed: {state.load_error}" if state.load_error else "loading"
        return JSONResponse({"status": status, "model": served_name}, status_code=503)

    def model_card() -> dict[str, Any]:
        return {"id": served_name, "object": "model", "created": 0, "owned_by": "safe-rlhf-v"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def check_model(name: str) -> None:
        if name != served_name:
            raise APIError(
                404,
                f"model {name!r} does not exist on this server; it serves {served_name!r}",
                param="model",
                code="model_not_found",
            )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        chat_request = parse_request(await read_body(request, body_limit))
        check_model(chat_request.model)
        turn = user_turn(chat_request.messages)
        max_tokens = chat_request.max_completion_tokens or chat_request.max_tokens
        if max_tokens is not None and max_tokens > limits.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens_limit} "
                "(serve.max_tokens_limit)",
                param="max_tokens",
            )
        image = await run_in_threadpool(decode_image, turn.image_url, limits)
        chat = state.chat
        if chat is None:
            raise APIError(
                503,
                "the model is still loading: retry when /readyz answers 200",
                kind="server_error",
                code="model_loading",
            )
        try:
            answer = await run_in_threadpool(
                chat.answer,
                image,
                turn.question,
                max_tokens=max_tokens,
                temperature=chat_request.temperature,
                top_p=chat_request.top_p,
                seed=chat_request.seed,
            )
        except Exception:
            log.exception("trace=%s: generation failed", request.state.trace_id)
            raise APIError(
                500, f"generation failed (trace id {request.state.trace_id})", kind="server_error"
            ) from None
        request.state.outcome = f"{answer.trace.outcome} rounds={answer.trace.rounds_used}"
        return JSONResponse(completion_body(served_name, answer))

    return app


def run_server(
    cfg: PipelineConfig,
    *,
    model: str,
    guard: str | None,
    host: str,
    port: int,
    name: str | None = None,
) -> None:
    """Resolve and check the models, then serve until stopped (uvicorn, one process).

    Returns when the server stops; raises the loading error if the models could not be loaded.
    """
    import uvicorn

    served = resolve_served_model(cfg, model, guard, name)
    server: uvicorn.Server | None = None

    def stop(_: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(
        served.name, lambda: GuardedChat.load(served, cfg.guardrail), cfg.serve, on_load_failure=stop
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False))
    logging.getLogger("uvicorn.error").setLevel(logging.INFO)  # its "Uvicorn running on ..." line
    log.info(
        "serving %r on http://%s:%d/v1 behind the guardrail (rounds %d, refusing %s requests); "
        "/readyz answers 200 once the models are loaded",
        served.name,
        host,
        port,
        cfg.guardrail.rounds,
        "/".join(cfg.guardrail.refuse_severities),
    )
    server.run()
    if app.state.models.load_error is not None:
        raise app.state.models.load_error
