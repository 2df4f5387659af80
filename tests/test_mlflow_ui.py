"""The MLflow UI, as a person sees it: `mlflow server` on 127.0.0.1 over the store the register stage
filled (`registered_run`), opened in headless Chromium through Playwright.

It checks what the issue found missing: the policy version shows its signature's inputs, its logged
model's MLmodel names the `python_function` flavour, and the pipeline's parent run is FINISHED.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from registered_run import RegisteredRun

from safe_rlhf_v import tracking

CHROMIUM = Path("/usr/bin/chromium")
MLFLOW = Path(sys.executable).with_name("mlflow")
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"the browser test needs Chromium at {CHROMIUM}, which this machine lacks"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def mlflow_ui(registered_run: RegisteredRun, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a free loopback port over the registered store; yields its base URL."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    command = [str(MLFLOW), "server", "--backend-store-uri", registered_run.tracking_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 40
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
        log.close()


def test_the_ui_shows_the_policy_versions_flavour_and_signature_and_a_finished_pipeline(
    registered_run: RegisteredRun, mlflow_ui: str
) -> None:
    from playwright.sync_api import expect, sync_playwright

    client = MlflowClient(registered_run.tracking_uri)
    names = registered_run.cfg.registry
    version = client.get_model_version(names.policy_name, "1")
    experiment = client.get_experiment_by_name(registered_run.cfg.tracking.experiment)
    parent = tracking.find_parent_run(experiment.experiment_id, "run-1")
    model_id = version.source.removeprefix("models:/")

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{mlflow_ui}/#/models/{names.policy_name}/versions/1")
            body = page.locator("body")
            expect(body).to_contain_text("Schema")
            page.get_by_text(re.compile(r"^Inputs \(2\)$")).first.click()  # the schema table starts folded
            expect(body).to_contain_text("image")
            expect(body).to_contain_text("question")

            page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/models/{model_id}/artifacts")
            page.get_by_text("MLmodel", exact=True).first.click()
            expect(body).to_contain_text("python_function")

            page.goto(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}")
            expect(body).to_contain_text(re.compile("finished", re.IGNORECASE))
        finally:
            browser.close()
