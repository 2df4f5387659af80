"""The stage context: output locations never lose the user's files, and MLflow runs always end."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from pipeline_yaml import config_file

from safe_rlhf_v import tracking
from safe_rlhf_v.cli import main
from safe_rlhf_v.config import ConfigError, PipelineConfig, config_from_dict
from safe_rlhf_v.records import RESULT_FILE, RecordError, StageResult
from safe_rlhf_v.stages.context import SIGTERM_EXIT, OutputLocationRefused, open_stage
from safe_rlhf_v.storage import StorageError


def tree_digest(root: Path) -> str:
    """One digest of every file's path and bytes under `root`: equal means nothing changed."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def cfg(tmp_path: Path) -> PipelineConfig:
    tree = {
        "work_dir": str(tmp_path / "work"),
        "data": {"uri": str(tmp_path / "data")},
        "base_model": "tiny/base",
        "tracking": {"experiment": "ctx"},
    }
    return config_from_dict(tree, "test")


def runs(cfg: PipelineConfig) -> list:
    experiment_id = tracking.configure(cfg.tracking, cfg.work_dir)
    return MlflowClient().search_runs([experiment_id])


# ------------------------------------------------------------------------------ output location


@pytest.mark.parametrize("where", ["foreign", "data", "inside-data", "work-dir", "work-cache", "file"])
def test_validate_data_refuses_an_out_it_would_destroy(
    tmp_path: Path, demo_data: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.parquet", "evaluation.parquet"):
        (data / name).write_bytes((demo_data / name).read_bytes())
    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    (work / "mlflow.db").write_bytes(b"the user's runs")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not yours")
    (tmp_path / "a-file").write_text("keep")
    out = {
        "foreign": foreign,
        "data": data,
        "inside-data": data / "validated",
        "work-dir": work,
        "work-cache": work / "cache" / "x",
        "file": tmp_path / "a-file",
    }[where]
    config = str(config_file(tmp_path, data))
    before = tree_digest(tmp_path)
    code = main(["validate-data", "--config", config, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(out) in err, err
    assert tree_digest(tmp_path) == before, "nothing of the user's changed"


def test_previous_output_of_the_same_stage_is_replaced_and_relative_out_works(
    tmp_path: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(config_file(tmp_path, demo_data))
    assert main(["validate-data", "--config", config, "--out", "validated"]) == 0
    first = json.loads((tmp_path / "validated" / RESULT_FILE).read_text())
    assert main(["validate-data", "--config", config, "--out", "validated"]) == 0
    second = json.loads((tmp_path / "validated" / RESULT_FILE).read_text())
    assert first["mlflow_run_id"] != second["mlflow_run_id"]
    assert first["details"]["train_sha256"] == second["details"]["train_sha256"]
    # Great-expectations wants absolute paths: the relative --out was resolved before it saw it.
    assert (tmp_path / "validated" / "data_docs" / "index.html").is_file()


def test_an_output_of_another_stage_is_not_replaced(
    tmp_path: Path, demo_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reward-model"
    out.mkdir()
    (out / RESULT_FILE).write_text(StageResult(stage="train-reward", status="succeeded").to_json())
    code = main(["validate-data", "--config", str(config_file(tmp_path, demo_data)), "--out", str(out)])
    assert code == 2
    assert "holds a train-reward output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [RESULT_FILE]


def test_unreachable_s3_out_fails_before_any_work(
    cfg: PipelineConfig, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    body_ran = []
    with (
        pytest.raises(StorageError, match="no-such-bucket"),
        open_stage("validate-data", cfg, "s3://no-such-bucket/out", inputs={}),
    ):
        body_ran.append(True)
    assert not body_ran
    assert runs(cfg) == [], "no MLflow run was opened for a stage that could not publish"


def test_out_overlapping_an_s3_input_is_refused(cfg: PipelineConfig) -> None:
    with (
        pytest.raises(OutputLocationRefused, match="--data"),
        open_stage("validate-data", cfg, "s3://b/data/out", inputs={"--data": "s3://b/data"}),
    ):
        pass


# ------------------------------------------------------------------------------ MLflow lifecycle


def test_failed_stage_ends_its_run_and_the_parent_failed_and_publishes_nothing(
    cfg: PipelineConfig, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    with (
        pytest.raises(ZeroDivisionError),
        open_stage("evaluate", cfg, str(out), inputs={}, pipeline_run_id="p1") as ctx,
    ):
        assert ctx.out is not None
        (ctx.out / "half.json").write_text("{")
        _ = 1 / 0
    assert not out.exists(), "a failed stage publishes nothing"
    statuses = {run.data.tags.get(tracking.STAGE_TAG, "parent"): run.info.status for run in runs(cfg)}
    assert statuses == {"evaluate": "FAILED", "parent": "FAILED"}


def test_a_retry_marks_the_killed_attempt_and_reopens_the_parent(cfg: PipelineConfig, tmp_path: Path) -> None:
    experiment_id = tracking.configure(cfg.tracking, cfg.work_dir)
    parent = tracking.ensure_parent_run(experiment_id, "p2")
    # What a SIGKILLed attempt leaves: its run RUNNING forever.
    orphan = MlflowClient().create_run(
        experiment_id,
        tags={
            tracking.STAGE_TAG: "train-guard",
            tracking.PIPELINE_RUN_TAG: "p2",
            "mlflow.parentRunId": parent,
        },
    )
    MlflowClient().set_terminated(parent, status="FAILED")
    with open_stage("train-guard", cfg, str(tmp_path / "g"), inputs={}, pipeline_run_id="p2") as ctx:
        assert MlflowClient().get_run(parent).info.status == "RUNNING"
        ctx.finish({"accuracy": 1.0})
    client = MlflowClient()
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(ctx.mlflow_run_id).info.status == "FINISHED"
    result = StageResult.from_json((tmp_path / "g" / RESULT_FILE).read_text())
    assert result.stage == "train-guard" and result.metrics == {"accuracy": 1.0}


def test_sigterm_ends_the_run_killed_and_publishes_nothing(cfg: PipelineConfig, tmp_path: Path) -> None:
    out, ready = tmp_path / "out", tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from safe_rlhf_v.config import config_from_dict
        from safe_rlhf_v.stages.context import open_stage
        cfg = config_from_dict({cfg.model_dump(mode="json")!r}, "test")
        with open_stage("evaluate", cfg, {str(out)!r}, inputs={{}}, pipeline_run_id="p3") as ctx:
            (ctx.out / "half.json").write_text("{{")
            Path({str(ready)!r}).touch()
            time.sleep(60)
        """
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 120
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == SIGTERM_EXIT
    assert not out.exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir()), "the staging folder is gone"
    statuses = {run.data.tags.get(tracking.STAGE_TAG, "parent"): run.info.status for run in runs(cfg)}
    assert statuses == {"evaluate": "KILLED", "parent": "KILLED"}


# --------------------------------------------------------------------------------- typed records


def test_a_malformed_result_names_its_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / RESULT_FILE
    path.write_text(json.dumps({"stage": "train-rewrad", "status": "succeeded"}))
    with pytest.raises(RecordError, match=rf"{path}.*stage"):
        StageResult.from_json(path.read_text(), str(path))


def test_a_misspelt_resources_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train-rewrad"):
        config_from_dict(
            {"base_model": "m", "data": {"uri": "d"}, "resources": {"train-rewrad": {"gpus": 8}}}, "test"
        )
