"""Shared fixtures: an S3 endpoint on 127.0.0.1 (moto's server) and an offline, telemetry-free env."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from registered_run import RegisteredRun

import safe_rlhf_v  # noqa: F401  (switches telemetry off before other imports)


@pytest.fixture(autouse=True)
def isolated_mlflow_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI (for child processes), so a test
    that opens a run in-process would otherwise send every later test's kfp.local tasks to its store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint served by moto on loopback for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 (and MLflow) at the moto endpoint with fake credentials; returns the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto endpoint; returns its name."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic BeaverTails-V parquet files (train 80 pairs, evaluation 24)."""
    from safe_rlhf_v.data.synthetic import write_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    write_demo_data(out, rows=80, eval_rows=24, seed=3)
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A tiny LLaVA built on the demo corpus (no supervised warm start: tests stay fast)."""
    from safe_rlhf_v.data.sources import load_split
    from safe_rlhf_v.data.synthetic import corpus
    from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm

    out = tmp_path_factory.mktemp("models") / "tiny"
    spec = TinyVLMSpec(text_hidden=64, text_ffn=128, vocab_size=512)
    return build_tiny_vlm(out, corpus(load_split(str(demo_data), "train")), spec=spec, seed=0)


@pytest.fixture(scope="session")
def validated_data(tmp_path_factory: pytest.TempPathFactory, demo_data: Path, tiny_model: Path) -> Path:
    """The demo data passed through the validate-data stage (what training stages consume)."""
    from safe_rlhf_v.config import config_from_dict
    from safe_rlhf_v.stages import validate_data

    work = tmp_path_factory.mktemp("work")
    cfg = config_from_dict(
        {
            "work_dir": str(work),
            "data": {"uri": str(demo_data)},
            "base_model": str(tiny_model),
            "validate_data": {"min_rows": {"train": 10, "evaluation": 10}},
        }
    )
    out = work / "validated"
    validate_data.run(cfg, str(out), pipeline_run_id="fixture")
    return out


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An HTTP URL on loopback whose server accepts every connection and never sends a byte: what a
    hung S3 or MLflow endpoint looks like to a client."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


@pytest.fixture(scope="session")
def registered_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> RegisteredRun:
    """Real policy, reward, cost and guard folders built on the tiny model (untrained heads; the guard
    calls every request safe and every answer harmless), each with the lineage of a training run,
    registered with an evaluation's figures by `stages.register.run`."""
    import hashlib

    import mlflow
    import torch
    from transformers import AutoProcessor

    from safe_rlhf_v import storage, tracking
    from safe_rlhf_v.config import config_from_dict
    from safe_rlhf_v.lineage import write_lineage
    from safe_rlhf_v.models.guard import QUERY_LABELS, RATINGS, GuardModel
    from safe_rlhf_v.models.score import ScoreModel
    from safe_rlhf_v.records import RESULT_FILE, Lineage, StageResult
    from safe_rlhf_v.stages import register

    root = tmp_path_factory.mktemp("registered-run")
    cfg = config_from_dict(
        {
            "work_dir": str(root / "work"),
            "data": {"uri": str(root / "data")},
            "base_model": str(tiny_model),
            "tracking": {"experiment": "registered-run"},
            "guardrail": {"rounds": 1, "generation": {"max_new_tokens": 6}},
        }
    )
    data_sha = {split: hashlib.sha256(split.encode()).hexdigest() for split in ("train", "evaluation")}
    processor = AutoProcessor.from_pretrained(tiny_model)
    folders = {role: root / role for role in ("reward", "cost", "guard", "policy")}
    for kind in ("reward", "cost"):
        ScoreModel.from_base(tiny_model, kind).save(folders[kind], processor=processor)
    guard = GuardModel.from_base(tiny_model)
    with torch.no_grad():
        for head in guard.heads.values():
            head.weight.zero_()
            head.bias.zero_()
        guard.heads["query"].bias[QUERY_LABELS.index("safe")] = 10.0
        guard.heads["rating"].bias[RATINGS.index(3)] = 10.0
    guard.save(folders["guard"], processor=processor)
    shutil.copytree(tiny_model, folders["policy"])
    for role, folder in folders.items():
        stage = "train-ppo-lag/safe-rlhf-v" if role == "policy" else f"train-{role}"
        with tracking.stage_run(stage, "run-1", cfg.tracking, cfg.work_dir) as run:
            mlflow.log_params({f"{stage}.train.learning_rate": "1e-05", f"{stage}.train.epochs": "1"})
            mlflow.log_metric("train/loss", 0.25)
        extra = {}
        if role == "policy":
            extra = {
                "variant": "safe-rlhf-v",
                "reward_model_sha256": storage.sha256_dir(folders["reward"]),
                "cost_model_sha256": storage.sha256_dir(folders["cost"]),
            }
        lineage = Lineage(
            stage=stage.partition("/")[0],
            kind=role,
            pipeline_run_id="run-1",
            mlflow_run_id=run.info.run_id,
            data_uri=cfg.data.uri,
            data_sha256=data_sha,
            base_model=str(tiny_model),
            base_model_sha256="hub:tiny",
            **extra,
        )
        write_lineage(folder, lineage)
    figures = {
        "evaluation/trained/reward": 1.0,
        "evaluation/trained/cost": -0.8,
        "evaluation/trained/harmful_share": 0.1,
        "evaluation/trained/harmful_share_upper": 0.15,
        "evaluation/initial/reward": 0.2,
        "evaluation/initial/cost": 0.4,
        "evaluation/initial/harmful_share": 0.6,
        "evaluation/win_rate/helpfulness": 0.7,
        "evaluation/win_rate/harmlessness": 0.8,
    }
    evaluation = root / "evaluation"
    evaluation.mkdir()
    result = StageResult(stage="evaluate", status="succeeded", metrics=figures, pipeline_run_id="run-1")
    (evaluation / RESULT_FILE).write_text(result.to_json())
    register.run(
        cfg,
        **{f"{role}_uri": str(folder) for role, folder in folders.items()},
        evaluation_uri=str(evaluation),
    )
    uri = tracking.resolve_tracking_uri(cfg.tracking, cfg.work_dir)
    return RegisteredRun(cfg=cfg, tracking_uri=uri, folders=folders, data_sha256=data_sha)
