"""How a training component launches its stage: in-process, torchrun in the pod, or a TrainJob."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest

from safe_rlhf_v.components import kfp_io
from safe_rlhf_v.config import PipelineConfig, config_from_dict
from safe_rlhf_v.ops import launch
from safe_rlhf_v.records import RESULT_FILE, StageResult


def cfg_with(resources: dict[str, Any]) -> PipelineConfig:
    return config_from_dict(
        {
            "data": {"uri": "s3://b/data"},
            "base_model": "s3://b/base",
            "resources": {"train-reward": resources},
        }
    )


def artifact(path: Path, uri: str) -> SimpleNamespace:
    return SimpleNamespace(path=str(path), uri=uri)


def write_result(folder: Path, stage: str = "train-reward") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULT_FILE).write_text(
        StageResult(stage=stage, status="succeeded", metrics={"accuracy": 0.9}).to_json()
    )


def test_one_gpu_runs_the_stage_function_in_process(tmp_path: Path) -> None:
    called = []
    result = kfp_io.train_stage(
        cfg_with({"gpus": 1}),
        "train-reward",
        "run-1",
        argv=["train-reward"],
        artifacts={},
        output=artifact(tmp_path, "s3://b/out"),
        in_process=lambda: called.append(1) or StageResult(stage="train-reward", status="succeeded"),
    )
    assert called == [1] and result.status == "succeeded"


def test_several_gpus_run_torchrun_with_local_paths_and_a_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = cfg_with({"gpus": 4})
    seen: dict[str, Any] = {}

    def fake_run_stage(argv: list[str], resources: Any, kube: Any, **kwargs: Any) -> int:
        seen.update(argv=argv, gpus=resources.gpus, kwargs=kwargs)
        config = Path(argv[argv.index("--config") + 1])
        seen["config"] = json.loads(config.read_text())
        write_result(tmp_path / "model")
        return 0

    monkeypatch.setattr(launch, "run_stage", fake_run_stage)
    result = kfp_io.train_stage(
        cfg,
        "train-reward",
        "run-1",
        argv=["train-reward", "--base-model", "s3://b/base"],
        artifacts={
            "--data": artifact(tmp_path / "data", "s3://b/data"),
            "--out": artifact(tmp_path / "model", "s3://b/m"),
        },
        output=artifact(tmp_path / "model", "s3://b/m"),
        in_process=lambda: pytest.fail("4 GPUs must not run in-process"),
    )
    assert seen["gpus"] == 4
    argv = seen["argv"]
    assert argv[:5] == ["train-reward", "--base-model", "s3://b/base", "--pipeline-run-id", "run-1"]
    assert argv[argv.index("--data") + 1] == str(tmp_path / "data")
    assert argv[argv.index("--out") + 1] == str(tmp_path / "model")
    assert seen["config"] == json.loads(cfg.model_dump_json())
    assert result.metrics == {"accuracy": 0.9}


def test_several_nodes_submit_a_trainjob_with_s3_uris_and_fetch_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_bucket: str, s3_env: str
) -> None:
    cfg = cfg_with({"gpus": 8, "nodes": 2})
    remote = tmp_path / "written-by-the-trainjob"
    write_result(remote)
    out_uri = f"s3://{s3_bucket}/runs/run-1/model"
    seen: dict[str, Any] = {}

    def fake_run_stage(argv: list[str], resources: Any, kube: Any, **kwargs: Any) -> int:
        seen.update(argv=argv, kwargs=kwargs)
        s3 = boto3.client("s3", endpoint_url=s3_env)
        s3.upload_file(str(remote / RESULT_FILE), s3_bucket, f"runs/run-1/model/{RESULT_FILE}")
        return 0

    monkeypatch.setattr(launch, "run_stage", fake_run_stage)
    local_out = tmp_path / "launcher-path"
    result = kfp_io.train_stage(
        cfg,
        "train-reward",
        "run-1",
        argv=["train-reward"],
        artifacts={
            "--data": artifact(tmp_path / "d", f"s3://{s3_bucket}/data"),
            "--out": artifact(local_out, out_uri),
        },
        output=artifact(local_out, out_uri),
        in_process=lambda: pytest.fail("2 nodes must not run in-process"),
    )
    argv = seen["argv"]
    assert argv[argv.index("--data") + 1] == f"s3://{s3_bucket}/data"
    assert argv[argv.index("--out") + 1] == out_uri
    assert "--config" not in argv, "TrainJob pods get the config as JSON, not a pod-local file"
    assert json.loads(seen["kwargs"]["config_json"]) == json.loads(cfg.model_dump_json())
    assert seen["kwargs"]["image"] == cfg.images.gpu
    assert (local_out / RESULT_FILE).exists(), "the TrainJob's output is fetched back for KFP's launcher"
    assert result.metrics == {"accuracy": 0.9}


def test_a_failed_launch_fails_the_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "run_stage", lambda *a, **k: 3)
    with pytest.raises(RuntimeError, match="train-reward: the torchrun launch exited with status 3"):
        kfp_io.train_stage(
            cfg_with({"gpus": 2}),
            "train-reward",
            "run-1",
            argv=["train-reward"],
            artifacts={},
            output=artifact(tmp_path, "s3://b/m"),
            in_process=lambda: pytest.fail("not in-process"),
        )
