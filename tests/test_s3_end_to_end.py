"""The whole local pipeline with S3 everywhere a cluster uses it: the data set, MLflow's artifact
store and the registered models' sources live on moto's S3 server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_pipeline import demo_config

from safe_rlhf_v import registry, storage
from safe_rlhf_v.config import config_from_dict
from safe_rlhf_v.pipelines.local import run_local


@pytest.mark.slow
def test_pipeline_reads_data_logs_artifacts_and_registers_models_on_s3(
    tmp_path: Path, demo_data: Path, tiny_model: Path, s3_bucket: str
) -> None:
    data_uri = f"s3://{s3_bucket}/data/demo"
    storage.upload(demo_data, data_uri)
    raw = demo_config(tmp_path, demo_data, tiny_model).model_dump(mode="json")
    raw["data"]["uri"] = data_uri
    raw["ablations"] = []
    raw["tracking"]["artifact_location"] = f"s3://{s3_bucket}/mlflow"
    raw["registry"]["publish_uri"] = f"s3://{s3_bucket}/models"
    cfg = config_from_dict(raw, "s3 end-to-end")

    run = run_local(cfg)

    assert run.succeeded, run.error
    assert set(run.stages) >= {"validate-data", "train-ppo-lag/safe-rlhf-v", "evaluate", "register"}
    validated = run.stages["validate-data"]
    assert validated["details"]["source_uri"] == data_uri, "the data set was read from S3"
    client = MlflowClient(run.tracking_uri)
    sources = {}
    for role, model_uri in run.stages["register"]["outputs"].items():
        name, version = model_uri.removeprefix("models:/").split("/")
        sources[role] = registry.folder_of(client.get_model_version(name, version))
    pipeline_run_id = run.stages["register"]["pipeline_run_id"]
    assert sources == {
        role: f"s3://{s3_bucket}/models/{pipeline_run_id}/{role}"
        for role in ("policy", "reward", "cost", "guard")
    }
    assert storage.exists(f"{sources['policy']}/config.json"), "the registered source is a real model folder"
    logged = storage.list_files(f"s3://{s3_bucket}/mlflow")
    assert any(key.endswith("evaluate/report.html") for key in logged), "MLflow artifacts went to S3"
