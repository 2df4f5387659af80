"""The serving Deployment holds together with the code it runs: the command parses, its overrides are
valid config, the probes hit the server's real routes, it gets a GPU, and the Service reaches it.

Schema validation, security settings and checkov cover it with every other manifest (test_manifests.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from safe_rlhf_v.cli import build_parser, default_config_path
from safe_rlhf_v.config import ImagesConfig, load_config
from safe_rlhf_v.serve import create_app

BASE = Path(__file__).resolve().parents[2] / "manifests" / "base"


def serve_objects() -> dict[str, dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all((BASE / "serve.yaml").read_text()) if doc]
    return {doc["kind"]: doc for doc in docs}


def test_serve_manifest_is_part_of_the_base() -> None:
    assert "serve.yaml" in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]


def test_serve_deployment_runs_a_valid_serve_command_on_a_gpu() -> None:
    objects = serve_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == ImagesConfig().gpu
    args = build_parser().parse_args([*container["command"][1:], *container["args"]])
    assert args.command == "serve" and args.model.startswith("models:/")
    assert args.host == "0.0.0.0"
    cfg = load_config(default_config_path(), overrides=args.set)  # the overrides are valid config
    assert Path(cfg.work_dir) == Path(container["volumeMounts"][0]["mountPath"])
    for bound in ("requests", "limits"):
        assert container["resources"][bound]["nvidia.com/gpu"] == 1
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert port == args.port
    service_port = objects["Service"]["spec"]["ports"][0]
    assert service_port["targetPort"] == "http"
    assert objects["NetworkPolicy"]["spec"]["ingress"][0]["ports"][0]["port"] == port
    assert pod["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]


def test_serve_probes_use_the_servers_health_routes() -> None:
    (container,) = serve_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    routes = {
        route.path for route in create_app("m", lambda: None, load_config(default_config_path()).serve).routes
    }
    assert {"/healthz", "/readyz"} <= routes
