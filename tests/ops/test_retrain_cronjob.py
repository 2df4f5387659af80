"""The retrain CronJob's script, run for real (sh, the installed `safe-rlhf-v`) against the fake KFP
API: twice, as two days of the CronJob, leaving one pipeline version and one recurring run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from fake_kfp_api import FakeKfpApi

ROOT = Path(__file__).resolve().parents[2]
MOUNT = "/etc/safe-rlhf-v/retrain"


def test_cronjob_script_uploads_once_and_keeps_one_recurring_run(tmp_path: Path) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "manifests/overlays/dev")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    docs = [doc for doc in yaml.safe_load_all(rendered) if doc]
    (cronjob,) = [d for d in docs if d["kind"] == "CronJob"]
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    (settings,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("safe-rlhf-v-retrain-")
    ]
    data = settings["data"]
    for key in ("params.yaml", "overrides"):
        (tmp_path / key).write_text(data[key])
    script = container["args"][0].replace(MOUNT, str(tmp_path))
    with FakeKfpApi() as fake:
        env = {
            **{k: v for k, v in data.items() if "." not in k and k != "overrides"},
            "KFP_HOST": fake.url,
            "HOME": str(tmp_path),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        }
        outputs = []
        for _ in range(2):
            result = subprocess.run(
                [*container["command"], script], env=env, capture_output=True, text=True, timeout=300
            )
            assert result.returncode == 0, result.stderr
            outputs.append(result.stdout)
        assert "created pipeline" in outputs[0] and "recurring run created" in outputs[0]
        assert "already uploaded" in outputs[1] and "recurring run unchanged" in outputs[1]
        assert len(fake.pipelines) == 1 and len(fake.versions) == 1 and len(fake.recurring_runs) == 1
        (recurring,) = fake.recurring_runs.values()
        assert recurring["display_name"] == data["RETRAIN_NAME"]
        assert recurring["runtime_config"]["parameters"] == yaml.safe_load(data["params.yaml"])
        (version,) = fake.versions.values()
        config = version["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
        assert config["config"]["defaultValue"] == data["PIPELINE_PRESET"].removesuffix(".yaml")
        overrides = config["config_overrides"]["defaultValue"]
        assert any("mlflow.kubeflow.svc" in item for item in overrides)  # the dev override applied
        assert fake.problems == []
