"""MLflow lineage: stage runs nest under the pipeline run or resume MLFLOW_RUN_ID; inputs carry digests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from safe_rlhf_v import tracking
from safe_rlhf_v.config import TrackingConfig


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrackingConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return TrackingConfig(experiment="test-lineage")


def test_default_store_is_sqlite_in_work_dir(store: TrackingConfig, tmp_path: Path) -> None:
    uri = tracking.resolve_tracking_uri(store, tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_stages_nest_under_one_parent(store: TrackingConfig, tmp_path: Path) -> None:
    with tracking.stage_run("validate-data", "pipe-1", store, tmp_path) as first:
        mlflow.log_metric("rows", 10)
    with tracking.stage_run("train-reward", "pipe-1", store, tmp_path) as second:
        pass
    client = MlflowClient()
    parent_a = client.get_run(first.info.run_id).data.tags["mlflow.parentRunId"]
    parent_b = client.get_run(second.info.run_id).data.tags["mlflow.parentRunId"]
    assert parent_a == parent_b
    parent = client.get_run(parent_a)
    assert parent.data.tags[tracking.PIPELINE_RUN_TAG] == "pipe-1"
    assert client.get_run(first.info.run_id).data.tags[tracking.STAGE_TAG] == "validate-data"
    # Artifacts of the local sqlite store live in the work dir, not in the process's cwd.
    assert client.get_experiment(first.info.experiment_id).artifact_location.startswith(
        (tmp_path.resolve() / "mlruns").as_uri()
    )


def test_resumes_run_injected_by_kfp_plugin(
    store: TrackingConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plugin makes one parent run per KFP run and a nested run per task, whose id it injects.
    experiment_id = tracking.configure(store, tmp_path)
    client = MlflowClient()
    plugin_parent = client.create_run(experiment_id, tags={tracking.PIPELINE_RUN_TAG: "pipe-2"}).info.run_id
    injected = client.create_run(experiment_id, tags={"mlflow.parentRunId": plugin_parent}).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", injected)
    with tracking.stage_run("validate-data", "pipe-2", store, tmp_path) as run:
        assert run.info.run_id == injected
    assert tracking.find_parent_run(experiment_id, "pipe-2").info.run_id == plugin_parent
    assert len(client.search_runs([experiment_id])) == 2  # nothing extra was created


def test_dataset_input_carries_full_sha256_and_source(store: TrackingConfig, tmp_path: Path) -> None:
    sha = hashlib.sha256(b"rows").hexdigest()
    with tracking.stage_run("validate-data", "pipe-3", store, tmp_path) as run:
        tracking.log_dataset(
            name="beavertails-v/train",
            source_uri="s3://bucket/data/train",
            sha256=sha,
            context="training",
            rows=3,
        )
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    recorded = inputs[0]
    assert recorded.dataset.name == "beavertails-v/train"
    assert recorded.dataset.digest == sha[:32]
    assert "s3://bucket/data/train" in recorded.dataset.source
    tags = {tag.key: tag.value for tag in recorded.tags}
    assert tags["sha256"] == sha
    assert tags["rows"] == "3"
    assert tags["mlflow.data.context"] == "training"


def test_flatten_params() -> None:
    assert tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "None",
    }
