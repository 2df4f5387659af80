"""The real KFP DAG: runs locally through kfp.local and compiles to a credential-free YAML."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from mlflow.tracking import MlflowClient

from safe_rlhf_v.cli import main
from safe_rlhf_v.config import PipelineConfig, config_from_dict
from safe_rlhf_v.data.synthetic import write_demo_data
from safe_rlhf_v.pipelines.local import run_local
from safe_rlhf_v.tracking import PIPELINE_RUN_TAG, STAGE_TAG


def demo_config(tmp_path: Path, data_uri: Path) -> PipelineConfig:
    return config_from_dict(
        {
            "name": "pipeline-test",
            "work_dir": str(tmp_path / "work"),
            "data": {"uri": str(data_uri)},
            "base_model": str(tmp_path / "model"),
            "tracking": {"experiment": "pipeline-test"},
            "validate_data": {"min_rows": {"train": 50, "evaluation": 10}, "fail_on_leakage": True},
            "resources": {"validate-data": {"cpu": "3", "memory": "12Gi"}},
        }
    )


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_demo_data(out, rows=80, eval_rows=20, seed=3)
    return out


@pytest.mark.slow
def test_local_run_validates_and_records_lineage(tmp_path: Path, demo_data: Path) -> None:
    cfg = demo_config(tmp_path, demo_data)
    run = run_local(cfg)
    assert run.succeeded, run.error
    summary = json.loads(run.summary_path.read_text())
    stage = summary["stages"]["validate-data"]
    assert stage["status"] == "succeeded"
    assert stage["metrics"]["train.rows"] == 80
    assert stage["metrics"]["evaluation.rows"] == 20
    assert stage["metrics"]["failed_expectations"] == 0

    validated = datasets.load_from_disk(stage["outputs"]["dataset"])
    assert set(validated) == {"train", "evaluation"}
    assert len(validated["train"]) == 80
    assert validated["train"][0]["image"].size == (64, 64)
    report = Path(stage["outputs"]["validated"]) / "report.html"
    assert "Data validation" in report.read_text()
    assert (Path(stage["outputs"]["validated"]) / "data_docs" / "index.html").exists()

    client = MlflowClient(run.tracking_uri)
    child = client.get_run(stage["mlflow_run_id"])
    assert child.data.tags[STAGE_TAG] == "validate-data"
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[PIPELINE_RUN_TAG] == stage["pipeline_run_id"]
    inputs = {item.dataset.name: item for item in child.inputs.dataset_inputs}
    train_sha = stage["details"]["train_sha256"]
    assert inputs["beavertails-v/train"].dataset.digest == train_sha[:32]
    assert {t.key: t.value for t in inputs["beavertails-v/train"].tags}["sha256"] == train_sha


@pytest.mark.slow
def test_failed_validation_fails_the_run_and_publishes_no_data(tmp_path: Path, demo_data: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for split in ("train", "evaluation"):
        table = datasets.Dataset.from_parquet(str(demo_data / f"{split}.parquet"))
        if split == "train":
            flags = ["maybe", *table["is_response_1_safe"][1:]]
            table = table.remove_columns("is_response_1_safe").add_column("is_response_1_safe", flags)
        table.to_parquet(str(broken / f"{split}.parquet"))
    run = run_local(demo_config(tmp_path, broken))
    assert not run.succeeded
    summary = json.loads(run.summary_path.read_text())
    assert summary["status"] == "failed"
    assert "validate-data" in summary["error"]
    assert not list(run.run_dir.rglob("dataset_dict.json")), "a failed validation must not publish data"


def test_compiled_pipeline_has_resources_and_no_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "sentinel-secret-value-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASENTINEL")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(demo_config(tmp_path, tmp_path / "data").model_dump(mode="json")))
    out = tmp_path / "compiled.yaml"
    assert main(["compile", "--config", str(config), "--out", str(out)]) == 0
    text = out.read_text()
    assert secret not in text and "AKIASENTINEL" not in text
    spec = next(yaml.safe_load_all(text))
    executor = next(iter(spec["deploymentSpec"]["executors"].values()))["container"]
    assert executor["image"].startswith("ghcr.io/safe-rlhf-v/cpu:")
    assert executor["resources"]["cpuRequest"] == 3
    assert executor["resources"]["memoryRequest"] == pytest.approx(12 * 1024**3 / 1e9, rel=0.01)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["data_uri"]["defaultValue"] == str(tmp_path / "data")
