"""A small fake of the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, for contract tests.

It serves the endpoints `kfp.Client` calls for upload / submit / schedule / runs, keeps their state
in memory, records every request (`requests`) and *checks* each against what the real API server
requires; a request that breaks the contract gets an HTTP 400 naming the problem and is listed in
`problems`, so a test can assert both what was sent and that nothing was wrong with it.

Shapes follow `kfp_server_api` (the client generated from the API's OpenAPI spec): JSON keys are
the proto field names, timestamps RFC 3339, a stored pipeline spec with a platform spec is nested
as `{"pipeline_spec": ..., "platform_spec": ...}` (backend `YamlStringToPipelineSpecStruct`).
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml
from loopback import LoopbackServer

API = "/apis/v2beta1"
EPOCH = "1970-01-01T00:00:00Z"


class Reject(Exception):
    """A request that breaks the API contract: answered with `status` and recorded as a problem."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """One recorded HTTP request; `json` for JSON bodies, `form`/`files` for multipart uploads."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)


class FakeKfpApi(LoopbackServer):
    """In-memory pipelines, versions, experiments, runs and recurring runs behind the v2beta1 routes."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.requests: list[Request] = []
        self.problems: list[str] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        self._clock = itertools.count()
        self._lock = threading.Lock()
        super().__init__(_handler_for(self))

    def calls(self, method: str, path: str) -> list[Request]:
        """The recorded requests to one route (path without the `/apis/v2beta1` prefix)."""
        return [r for r in self.requests if r.method == method and r.path == API + path]

    def finish_run(self, run_id: str, state: str) -> None:
        """Let a run end in `state` (as the backend would once its workflow stops)."""
        self.runs[run_id] |= {"state": state, "finished_at": self._now()}

    # --- dispatch ------------------------------------------------------------------------------

    def handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(request)
            try:
                self._check_auth(request)
                return 200, self._route(request)
            except Reject as rejected:
                self.problems.append(f"{request.method} {request.path}: {rejected}")
                return rejected.status, {"error": str(rejected), "message": str(rejected), "code": 3}

    def _route(self, r: Request) -> dict[str, Any]:
        parts = r.path.removeprefix(API).strip("/").split("/")
        routes = {
            ("GET", "healthz"): lambda: {"multi_user": False, "pipeline_store": "database"},
            ("POST", "pipelines"): lambda: self._create_pipeline(r),
            ("POST", "pipelines/upload_version"): lambda: self._upload_version(r),
            ("GET", "pipelines"): lambda: self._list("pipelines", self.pipelines.values(), r),
            ("GET", "experiments"): lambda: self._list("experiments", self.experiments.values(), r),
            ("POST", "experiments"): lambda: self._create_experiment(r),
            ("GET", "runs"): lambda: self._list_runs(r),
            ("POST", "runs"): lambda: self._create_run(r),
            ("GET", "recurringruns"): lambda: self._list_recurring(r),
            ("POST", "recurringruns"): lambda: self._create_recurring(r),
        }
        route = routes.get((r.method, "/".join(parts)))
        if route is not None:
            return route()
        if r.method == "GET" and len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions":
            return self._list_versions(parts[1], r)
        if r.method == "GET" and len(parts) == 4 and parts[0] == "pipelines" and parts[2] == "versions":
            return self._get_version(parts[1], parts[3])
        if r.method == "DELETE" and len(parts) == 2 and parts[0] == "recurringruns":
            return self._delete_recurring(parts[1])
        raise Reject(f"no such route in the fake: {r.method} {r.path}", status=404)

    def _check_auth(self, r: Request) -> None:
        if self.token is not None and r.headers.get("authorization") != f"Bearer {self.token}":
            raise Reject("missing or wrong bearer token", status=401)

    def _now(self) -> str:
        """A strictly increasing clock, so "newest first" is well defined."""
        start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        return (start + timedelta(minutes=next(self._clock))).strftime("%Y-%m-%dT%H:%M:%SZ")

    # --- pipelines -----------------------------------------------------------------------------

    @staticmethod
    def _spec_from_upload(r: Request) -> dict[str, Any]:
        if "multipart/form-data" not in r.headers.get("content-type", ""):
            raise Reject("an upload must be multipart/form-data")
        if "uploadfile" not in r.files:
            raise Reject("the multipart body has no 'uploadfile' part")
        try:
            docs = [doc for doc in yaml.safe_load_all(r.files["uploadfile"]) if doc]
        except yaml.YAMLError as error:
            raise Reject(f"uploadfile is not YAML: {error}") from None
        if not docs or not {"pipelineInfo", "root", "schemaVersion"} <= set(docs[0]):
            raise Reject("uploadfile is not a compiled KFP pipeline spec (pipelineInfo, root, schemaVersion)")
        platforms = [doc for doc in docs[1:] if "platforms" in doc]
        return {"pipeline_spec": docs[0], "platform_spec": platforms[0]} if platforms else docs[0]

    def _create_pipeline(self, r: Request) -> dict[str, Any]:
        """POST /pipelines: a pipeline with no version yet (versions come by upload_version)."""
        body = _json_body(r)
        name = body.get("display_name") or ""
        if not name.strip():
            raise Reject("pipeline display_name is required")
        if any(p["display_name"] == name for p in self.pipelines.values()):
            raise Reject(f"a pipeline named {name} already exists", status=409)
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "display_name": name,
            "name": name,
            "description": body.get("description") or "",
            "created_at": self._now(),
            "namespace": body.get("namespace") or "",
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        return pipeline

    def _upload_version(self, r: Request) -> dict[str, Any]:
        name, pipeline_id = r.query.get("name", ""), r.query.get("pipelineid", "")
        if not name.strip():
            raise Reject("query parameter 'name' (the version's name) is required")
        if pipeline_id not in self.pipelines:
            raise Reject(f"query parameter 'pipelineid'={pipeline_id!r} names no pipeline", status=404)
        spec = self._spec_from_upload(r)
        if any(v["pipeline_id"] == pipeline_id and v["display_name"] == name for v in self.versions.values()):
            raise Reject(f"pipeline {pipeline_id} already has a version named {name}", status=409)
        return self._add_version(pipeline_id, name, spec, r.query.get("description", ""))

    def _add_version(
        self, pipeline_id: str, name: str, spec: dict[str, Any], description: str
    ) -> dict[str, Any]:
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": self._now(),
            "pipeline_spec": spec,
        }
        self.versions[version["pipeline_version_id"]] = version
        return version

    def _list_versions(self, pipeline_id: str, r: Request) -> dict[str, Any]:
        if pipeline_id not in self.pipelines:
            raise Reject(f"no pipeline {pipeline_id}", status=404)
        mine = [v for v in self.versions.values() if v["pipeline_id"] == pipeline_id]
        return self._list("pipeline_versions", mine, r)

    def _get_version(self, pipeline_id: str, version_id: str) -> dict[str, Any]:
        version = self.versions.get(version_id)
        if version is None or version["pipeline_id"] != pipeline_id:
            raise Reject(f"pipeline {pipeline_id} has no version {version_id}", status=404)
        return version

    # --- listing -------------------------------------------------------------------------------

    def _list(
        self, key: str, items: Any, r: Request, *, extra: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Filter (display_name EQUALS), sort (`created_at desc` or none) and page_size, as the API does."""
        selected = list(items)
        for predicate in json.loads(r.query["filter"])["predicates"] if r.query.get("filter") else []:
            if predicate.get("key") != "display_name" or predicate.get("operation") not in ("EQUALS", 1):
                raise Reject(f"the fake filters only on display_name EQUALS, got {predicate}")
            selected = [item for item in selected if item["display_name"] == predicate.get("stringValue")]
        for name, value in (extra or {}).items():
            selected = [item for item in selected if item.get(name) == value]
        sort_by = r.query.get("sort_by", "")
        if sort_by not in ("", "created_at desc"):
            raise Reject(f"the fake sorts only by 'created_at desc', got {sort_by!r}")
        if sort_by:
            selected.sort(key=lambda item: item["created_at"], reverse=True)
        size = int(r.query.get("page_size") or 10)
        if size < 1:
            raise Reject(f"page_size must be positive, got {size}")
        body: dict[str, Any] = {"total_size": len(selected)}
        if selected:
            body[key] = selected[:size]
        return body

    # --- experiments and runs ------------------------------------------------------------------

    def _create_experiment(self, r: Request) -> dict[str, Any]:
        body = _json_body(r)
        name = body.get("display_name") or ""
        if not name.strip():
            raise Reject("experiment display_name is required")
        if any(e["display_name"] == name for e in self.experiments.values()):
            raise Reject(f"an experiment named {name} already exists", status=409)
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": body.get("description") or "",
            "namespace": body.get("namespace") or "",
            "created_at": self._now(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _checked_source(self, body: dict[str, Any], *, version_required: bool) -> dict[str, Any]:
        """The pipeline spec a run would execute, after checking its reference and parameters."""
        if body.get("experiment_id") not in self.experiments:
            raise Reject(f"experiment_id {body.get('experiment_id')!r} names no experiment")
        if not (body.get("display_name") or "").strip():
            raise Reject("display_name is required")
        if body.get("pipeline_spec") is not None:
            raise Reject("this product runs uploaded versions, not inline pipeline_spec")
        reference = body.get("pipeline_version_reference") or {}
        pipeline_id, version_id = reference.get("pipeline_id"), reference.get("pipeline_version_id")
        if pipeline_id not in self.pipelines:
            raise Reject(f"pipeline_version_reference.pipeline_id {pipeline_id!r} names no pipeline")
        if version_id is None and version_required:
            raise Reject("pipeline_version_reference.pipeline_version_id is required for a run")
        mine = sorted(
            (v for v in self.versions.values() if v["pipeline_id"] == pipeline_id),
            key=lambda v: v["created_at"],
        )
        if not mine:
            raise Reject(f"pipeline {pipeline_id} has no versions")
        version = self.versions.get(version_id) if version_id else mine[-1]
        if version is None or version["pipeline_id"] != pipeline_id:
            raise Reject(f"pipeline {pipeline_id} has no version {version_id!r}")
        spec = version["pipeline_spec"].get("pipeline_spec", version["pipeline_spec"])
        declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
        given = (body.get("runtime_config") or {}).get("parameters") or {}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise Reject(f"runtime_config.parameters has unknown parameter(s) {unknown}")
        for name, value in given.items():
            kind = declared[name].get("parameterType", "")
            if not _JSON_TYPES.get(kind, lambda _: True)(value):
                raise Reject(f"runtime_config.parameters.{name} must be a JSON {kind}, got {value!r}")
        return version

    def _create_run(self, r: Request) -> dict[str, Any]:
        body = _json_body(r)
        self._checked_source(body, version_required=True)
        run = body | {
            "run_id": str(uuid.uuid4()),
            "state": "PENDING",
            "created_at": self._now(),
            "finished_at": EPOCH,
            "storage_state": "AVAILABLE",
        }
        self.runs[run["run_id"]] = run
        return run

    def _list_runs(self, r: Request) -> dict[str, Any]:
        experiment = r.query.get("experiment_id")
        if experiment is not None and experiment not in self.experiments:
            raise Reject(f"experiment_id {experiment!r} names no experiment", status=404)
        return self._list(
            "runs", self.runs.values(), r, extra={"experiment_id": experiment} if experiment else None
        )

    def _create_recurring(self, r: Request) -> dict[str, Any]:
        body = _json_body(r)
        self._checked_source(body, version_required=False)
        cron = ((body.get("trigger") or {}).get("cron_schedule") or {}).get("cron", "")
        if len(cron.split()) != 6:
            raise Reject(f"trigger.cron_schedule.cron must have 6 fields (seconds first), got {cron!r}")
        if str(body.get("max_concurrency")) != "1":
            raise Reject(f"max_concurrency must be 1 for retraining, got {body.get('max_concurrency')!r}")
        if body.get("no_catchup") is not True:
            raise Reject(f"no_catchup must be true, got {body.get('no_catchup')!r}")
        if body.get("mode") != "ENABLE":
            raise Reject(f"mode must be ENABLE, got {body.get('mode')!r}")
        recurring = body | {
            "recurring_run_id": str(uuid.uuid4()),
            "created_at": self._now(),
            "status": "ENABLED",
        }
        # What the API server writes into the ScheduledWorkflow it creates: each value as JSON text
        # (backend/src/apiserver/template/template.go, StringMapToCRDParameters).
        parameters = (body.get("runtime_config") or {}).get("parameters") or {}
        recurring["_crd_parameters"] = [{"name": k, "value": json.dumps(v)} for k, v in parameters.items()]
        self.recurring_runs[recurring["recurring_run_id"]] = recurring
        return _public(recurring)

    def _list_recurring(self, r: Request) -> dict[str, Any]:
        experiment = r.query.get("experiment_id")
        extra = {"experiment_id": experiment} if experiment else None
        listed = self._list("recurringRuns", self.recurring_runs.values(), r, extra=extra)
        if "recurringRuns" in listed:
            listed["recurringRuns"] = [_public(item) for item in listed["recurringRuns"]]
        return listed

    def _delete_recurring(self, recurring_run_id: str) -> dict[str, Any]:
        if self.recurring_runs.pop(recurring_run_id, None) is None:
            raise Reject(f"no recurring run {recurring_run_id}", status=404)
        return {}

    def trigger(self, recurring_run_id: str) -> dict[str, Any]:
        """One cron tick, as KFP's ScheduledWorkflow controller does it: the run's parameters are the
        CRD's values parsed as JSON; a value that does not parse fails the tick (raises ValueError)."""
        recurring = self.recurring_runs[recurring_run_id]
        parameters = {p["name"]: json.loads(p["value"]) for p in recurring["_crd_parameters"]}
        with self._lock:
            body = {key: value for key, value in recurring.items() if not key.startswith("_")}
            body |= {"runtime_config": {"parameters": parameters}, "recurring_run_id": recurring_run_id}
            self._checked_source(body, version_required=False)
            run = body | {"run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": self._now()}
            self.runs[run["run_id"]] = run
        return run


_JSON_TYPES: dict[str, Any] = {
    "STRING": lambda v: isinstance(v, str),
    "NUMBER_INTEGER": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "NUMBER_DOUBLE": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "BOOLEAN": lambda v: isinstance(v, bool),
    "LIST": lambda v: isinstance(v, list),
    "STRUCT": lambda v: isinstance(v, dict),
}
"""The JSON value each declared parameter type accepts (KFP's driver checks the same at run time)."""


def _public(item: dict[str, Any]) -> dict[str, Any]:
    """An object as the API returns it, without the fake's bookkeeping (`_` keys)."""
    return {key: value for key, value in item.items() if not key.startswith("_")}


def _json_body(r: Request) -> dict[str, Any]:
    if r.json is None:
        raise Reject("the body must be JSON (Content-Type: application/json)")
    return r.json


def _parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    files = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            files[str(name)] = part.get_payload(decode=True) or b""
    return files


def _handler_for(fake: FakeKfpApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
            headers = {key.lower(): value for key, value in self.headers.items()}
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            request = Request(self.command, url.path, query, headers)
            content_type = headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                request.files = _parse_multipart(content_type, raw)
            elif raw:
                request.json = json.loads(raw)
            status, payload = fake.handle(request)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

    return Handler
