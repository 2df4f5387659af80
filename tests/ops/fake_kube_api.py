"""A tiny fake of the Kubernetes API's TrainJob routes on 127.0.0.1, for `submit_trainjob` tests.

Create stores the object (409 if the name is taken, 400 if it is not a `trainer.kubeflow.org/v1alpha1`
TrainJob for this namespace), each GET returns it with the next of the scripted `statuses` (the last
one repeats), DELETE removes it. Every request is recorded as (method, path, JSON body).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any

from loopback import LoopbackServer

PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"


class FakeKubeApi(LoopbackServer):
    """TrainJobs in memory; `statuses` is what successive GETs report as `.status`."""

    def __init__(self, statuses: Sequence[dict[str, Any]]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        self.objects: dict[str, dict[str, Any]] = {}
        super().__init__(_handler_for(self))

    def handle(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        self.requests.append((method, path, body))
        if not path.startswith(PREFIX):
            return 404, _status(404, f"no route {path}")
        namespace, _, rest = path.removeprefix(PREFIX).partition("/trainjobs")
        name = rest.strip("/")
        if method == "POST" and not name:
            return self._create(namespace, body or {})
        obj = self.objects.get(f"{namespace}/{name}")
        if obj is None:
            return 404, _status(404, f'trainjobs.trainer.kubeflow.org "{name}" not found')
        if method == "GET":
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            return 200, obj | {"status": status}
        if method == "DELETE":
            del self.objects[f"{namespace}/{name}"]
            return 200, _status(200, "deleted")
        return 405, _status(405, f"{method} not allowed")

    def _create(self, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        meta = body.get("metadata", {})
        if (body.get("apiVersion"), body.get("kind")) != ("trainer.kubeflow.org/v1alpha1", "TrainJob"):
            return 400, _status(400, "not a trainer.kubeflow.org/v1alpha1 TrainJob")
        if meta.get("namespace") != namespace:
            return 400, _status(
                400, f"metadata.namespace {meta.get('namespace')!r} != URL namespace {namespace}"
            )
        key = f"{namespace}/{meta.get('name')}"
        if key in self.objects:
            return 409, _status(409, f'trainjobs.trainer.kubeflow.org "{meta.get("name")}" already exists')
        self.objects[key] = body
        return 201, body


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


def _handler_for(fake: FakeKubeApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            status, payload = fake.handle(
                self.command, self.path.split("?")[0], json.loads(raw) if raw else None
            )
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
