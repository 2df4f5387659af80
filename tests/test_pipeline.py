"""The real KFP DAG: runs locally through kfp.local and compiles to a credential-free YAML."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoConfig

from safe_rlhf_v.cli import main
from safe_rlhf_v.config import PipelineConfig, config_from_dict, load_config
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.data.synthetic import corpus
from safe_rlhf_v.lineage import read_lineage
from safe_rlhf_v.models.family import FAMILIES, family_of
from safe_rlhf_v.models.score import ScoreModel
from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm
from safe_rlhf_v.pipelines.local import run_local
from safe_rlhf_v.summary import format_summary
from safe_rlhf_v.tracking import PIPELINE_RUN_TAG, STAGE_TAG


def demo_config(tmp_path: Path, data_uri: Path, model: Path | None = None) -> PipelineConfig:
    quick = {"max_length": 192, "train": {"epochs": 1, "max_steps": 3, "per_device_batch_size": 8}}
    ppo_train = {"epochs": 1, "max_steps": 2, "per_device_batch_size": 4, "precision": "fp32"}
    ppo = {
        "actor": ppo_train,
        "critic": ppo_train,
        "prompt_batch_size": 4,
        "generation": {"max_new_tokens": 8},
        "eval_prompts": 8,
    }
    return config_from_dict(
        {
            "name": "pipeline-test",
            "work_dir": str(tmp_path / "work"),
            "data": {"uri": str(data_uri)},
            "base_model": str(model or tmp_path / "model"),
            "tracking": {"experiment": "pipeline-test"},
            "validate_data": {"min_rows": {"train": 50, "evaluation": 10}, "fail_on_leakage": True},
            "train_reward": quick,
            "train_cost": quick,
            "train_guard": quick,
            "train_ppo_lag": ppo,
            "ablations": ["reward-only"],
            "evaluate": {
                "prompts": 8,
                "batch_size": 8,
                "generation": {"max_new_tokens": 8},
                "bootstrap_samples": 200,
                "examples": 2,
                "ground_truth": True,
            },
            "guardrail": {"rounds": 2, "generation": {"max_new_tokens": 8}},
            "resources": {
                "validate-data": {"cpu": "3", "memory": "12Gi"},
                "train-reward": {"cpu": "8", "memory": "64Gi", "gpus": 2},
            },
        }
    )


@pytest.mark.slow
def test_local_run_validates_trains_and_records_lineage(
    tmp_path: Path, demo_data: Path, tiny_model: Path
) -> None:
    cfg = demo_config(tmp_path, demo_data, tiny_model)
    run = run_local(cfg)
    assert run.succeeded, run.error
    summary = json.loads(run.summary_path.read_text())
    stage = summary["stages"]["validate-data"]
    assert stage["status"] == "succeeded"
    assert stage["metrics"]["train.rows"] == 80
    assert stage["metrics"]["evaluation.rows"] == 24
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

    for name, kind, headline in (
        ("train-reward", "reward", "accuracy"),
        ("train-cost", "cost", "sign_accuracy"),
    ):
        trained = summary["stages"][name]
        assert trained["status"] == "succeeded"
        assert 0.0 <= trained["metrics"][headline] <= 1.0
        model_dir = Path(trained["outputs"]["model"])
        assert ScoreModel.load(str(model_dir)).kind == kind
        lineage = read_lineage(str(model_dir))
        assert lineage.data_sha256["train"] == train_sha, "the model traces back to the validated data"
        assert client.get_run(trained["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == parent.info.run_id

    guard = summary["stages"]["train-guard"]
    assert 0.0 <= guard["metrics"]["safe_accuracy"] <= 1.0
    assert read_lineage(guard["outputs"]["model"]).data_sha256["train"] == train_sha
    reward_dir = summary["stages"]["train-reward"]["outputs"]["model"]
    for variant in ("safe-rlhf-v", "reward-only"):
        ppo = summary["stages"][f"train-ppo-lag/{variant}"]
        assert {"initial_reward", "trained_reward", "trained_harmful_share", "trained_truth_harmful_share",
                "truth_win_rate_helpfulness"} <= set(ppo["metrics"])  # fmt: skip
        lineage = read_lineage(ppo["outputs"]["model"])
        assert lineage.variant == variant and lineage.reward_model == reward_dir
        assert lineage.data_sha256["train"] == train_sha
    printed = format_summary(run)
    assert "initial policy" in printed and "reward-only" in printed

    evaluated = summary["stages"]["evaluate"]
    figures = evaluated["metrics"]
    assert 0.0 <= figures["evaluation/trained/harmful_share"] <= 1.0
    shares = [figures[f"evaluation/{k}/helpfulness"] for k in ("win_share", "tie_rate", "loss_rate")]
    assert sum(shares) == pytest.approx(1.0)
    for policy in ("initial", "trained"):  # the synthetic world's exact judge graded both policies
        assert 0.0 <= figures[f"evaluation/{policy}/truth/harmful_share"] <= 1.0
        assert 0.0 <= figures[f"evaluation/{policy}/truth/off_distribution_share"] <= 1.0
    assert 0.0 <= figures["evaluation/truth/win_rate/helpfulness"] <= 1.0
    assert figures["evaluation/judges_disagree"] in (0.0, 1.0)
    report = Path(evaluated["outputs"]["report"]).read_text()
    assert "<table" in report and "data:image/png;base64," in report
    assert "ground truth: harmful share" in report and "Every judge of harm" in report
    assert f"report:   {evaluated['outputs']['report']}" in printed

    registered = summary["stages"]["register"]["outputs"]
    name, version = registered["policy"].removeprefix("models:/").split("/")
    assert str(client.get_model_version_by_alias(name, "candidate").version) == version
    tags = client.get_model_version(name, version).tags
    assert tags["data_sha256.train"] == train_sha, "the candidate traces back to the data digest"
    assert tags["pipeline_run_id"] == stage["pipeline_run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"llava"}))  # llava: the test above
def test_every_stage_runs_on_each_model_family(tmp_path: Path, demo_data: Path, family: str) -> None:
    """The whole DAG on a tiny model of every other supported family: each stage succeeds, and the
    registered policy is that family's model."""
    texts = corpus(load_split(str(demo_data), "train"))
    spec = TinyVLMSpec(text_hidden=64, text_ffn=128, vocab_size=512)
    model = build_tiny_vlm(tmp_path / "model", texts, family=family, spec=spec, seed=0)
    run = run_local(demo_config(tmp_path, demo_data, model))
    assert run.succeeded, run.error
    stages = json.loads(run.summary_path.read_text())["stages"]
    assert {name: stage["status"] for name, stage in stages.items()} == dict.fromkeys(stages, "succeeded")
    assert {"validate-data", "train-reward", "train-cost", "train-guard", "train-ppo-lag/safe-rlhf-v",
            "train-ppo-lag/reward-only", "evaluate", "register"} <= set(stages)  # fmt: skip
    policy = stages["train-ppo-lag/safe-rlhf-v"]["outputs"]["model"]
    assert family_of(AutoConfig.from_pretrained(policy)).name == family
    assert 0.0 <= stages["evaluate"]["metrics"]["evaluation/trained/harmful_share"] <= 1.0


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
    assert "train-reward" not in run.stages
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
    raw = demo_config(tmp_path, tmp_path / "data").model_dump(mode="json")
    raw["kubernetes"] |= {
        "gpu_node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "env": {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000"},
        "shm_size": "8Gi",
    }
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "compiled.yaml"
    uri = "s3://bucket/configs/pipeline.yaml"
    assert main(["compile", "--config", str(config), "--config-uri", uri, "--out", str(out)]) == 0
    text = out.read_text()
    assert secret not in text and "AKIASENTINEL" not in text
    spec = next(yaml.safe_load_all(text))
    executors = {name: e["container"] for name, e in spec["deploymentSpec"]["executors"].items()}
    validate = executors["exec-validate-data"]
    assert validate["image"].startswith("ghcr.io/safe-rlhf-v/cpu:")
    assert validate["resources"]["cpuRequest"] == 3
    assert validate["resources"]["memoryRequest"] == pytest.approx(12 * 1024**3 / 1e9, rel=0.01)
    train = executors["exec-train-reward"]
    assert train["image"].startswith("ghcr.io/safe-rlhf-v/train:")
    assert train["resources"]["accelerator"]["resourceCount"] == "2"
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["train-reward"]["cachingOptions"] == {}, "training is never served from cache"
    assert tasks["train-reward"]["retryPolicy"] == {
        "backoffDuration": "120s",
        "backoffFactor": 2.0,
        "backoffMaxDuration": "3600s",
        "maxRetryCount": 2,
    }
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["data_uri"]["defaultValue"] == str(tmp_path / "data")
    assert params["base_model"]["defaultValue"] == str(tmp_path / "model")
    assert params["cost_budget"]["defaultValue"] == -0.5
    assert params["ablations"]["defaultValue"] == ["reward-only"]
    assert params["config"]["defaultValue"] == uri

    platform = next(doc for doc in yaml.safe_load_all(text) if "platforms" in doc)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu = k8s["exec-train-reward"]
    assert {s["secretName"] for s in gpu["secretAsEnv"]} == {"safe-rlhf-v-s3", "safe-rlhf-v-mlflow"}
    keys = {m["secretKey"]: m["envVar"] for s in gpu["secretAsEnv"] for m in s["keyToEnv"]}
    assert keys["AWS_SECRET_ACCESS_KEY"] == "AWS_SECRET_ACCESS_KEY"
    assert gpu["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "8Gi", "volumeName": "dshm"}
    ]
    assert gpu["nodeSelector"] == {"labels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    assert gpu["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    cpu = k8s["exec-validate-data"]
    assert "emptyDirMounts" not in cpu and "nodeSelector" not in cpu, "CPU stages stay off GPU nodes"
    env = {e["name"]: e["value"] for e in executors["exec-validate-data"]["env"]}
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc:5000"}


@pytest.mark.parametrize(
    "preset", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
)
def test_every_preset_compiles(tmp_path: Path, preset: str) -> None:
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "compiled.yaml"
    assert main(["compile", "--config", str(root / "configs" / preset), "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["base_model"]["defaultValue"] == (
        load_config(root / "configs" / preset).base_model
    )


def test_checked_in_pipeline_yaml_is_current(tmp_path: Path) -> None:
    """pipelines/safe_rlhf_v.yaml is what the Kubeflow UI gets: regenerate it with `make compile`."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "compiled.yaml"
    assert main(["compile", "--config", str(root / "configs/llava-1.5-7b.yaml"), "--out", str(out)]) == 0
    checked_in = root / "pipelines/safe_rlhf_v.yaml"
    assert out.read_text() == checked_in.read_text(), (
        "pipelines/safe_rlhf_v.yaml is stale: run `make compile`"
    )
    spec = next(yaml.safe_load_all(checked_in.read_text()))
    ppo = spec["deploymentSpec"]["executors"]["exec-train-ppo-lag"]["container"]
    assert ppo["resources"]["accelerator"]["resourceCount"] == "8"
