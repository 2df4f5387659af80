"""The Kubeflow run form, read off the checked-in compiled spec: what a person sees and what KFP caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from safe_rlhf_v.cli import main
from safe_rlhf_v.components import kfp_io
from safe_rlhf_v.config import ConfigError, load_config, preset_path, resolve_config

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipelines" / "safe_rlhf_v.yaml"


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(COMPILED.read_text()))


def all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task of the DAG, the ones inside the ablation loop included, by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks |= component.get("dag", {}).get("tasks", {})
    return {name: task for name, task in tasks.items() if not name.startswith("for-loop")}


def test_every_parameter_has_a_description_and_a_default_of_its_type(documents: list[dict]) -> None:
    params = documents[0]["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {
        "data_uri", "base_model", "cost_budget", "ppo_max_steps", "ablations", "config", "config_overrides"
    }  # fmt: skip
    for name, param in params.items():
        assert len(param.get("description", "")) > 40, f"{name} has no useful description"
    assert params["ppo_max_steps"]["parameterType"] == "NUMBER_INTEGER"
    default = params["ppo_max_steps"]["defaultValue"]
    assert default == 0 and type(default) is int, "an int parameter's default shows as an int"
    assert "#    ppo_max_steps: int [Default: 0]" in COMPILED.read_text()


def test_the_config_is_a_short_reference_that_resolves_in_the_image(documents: list[dict]) -> None:
    params = documents[0]["root"]["inputDefinitions"]["parameters"]
    assert params["config"]["defaultValue"] == "llava-1.5-7b"
    assert params["config_overrides"]["defaultValue"] == []
    assert all(len(str(param.get("defaultValue", ""))) < 100 for param in params.values())
    cfg = kfp_io.parse_config("llava-1.5-7b", [], cost_budget=-1.5, ppo_max_steps=7)
    assert cfg.base_model == params["base_model"]["defaultValue"]
    assert cfg.train_ppo_lag.lagrangian.threshold == -1.5 and cfg.train_ppo_lag.actor.max_steps == 7


def test_components_and_tasks_are_named_after_their_stage(documents: list[dict]) -> None:
    spec = documents[0]
    tasks = all_tasks(spec)
    expected = {
        "validate-data", "train-reward", "train-cost", "train-guard", "train-ppo-lag",
        "train-ppo-lag-ablation", "evaluate", "register",
    }  # fmt: skip
    assert set(tasks) == expected
    for name, task in tasks.items():
        assert task["componentRef"]["name"] == f"comp-{name}"
        assert task["taskInfo"]["name"] == name
    assert {name for name in spec["components"] if not name.startswith("comp-for-loop")} == {
        f"comp-{name}" for name in expected
    }


def test_cacheable_tasks_have_inputs_that_do_not_change_every_run(documents: list[dict]) -> None:
    spec, platform = documents
    tasks = all_tasks(spec)
    for name, task in tasks.items():
        cached = task["cachingOptions"].get("enableCache", False)
        assert cached == (not name.startswith("train-")), f"{name}: training is not cached by default"
        assert "pipeline_job" not in yaml.safe_dump(task["inputs"]), f"{name} takes the run id as an input"
    assert "pipeline_job_uuid" not in COMPILED.read_text()
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in tasks:
        run_id = executors[f"exec-{name}"]["fieldPathAsEnv"]
        assert {"name": kfp_io.RUN_ID_ENV, "fieldPath": "metadata.labels['pipeline/runid']"} in run_id


def test_a_local_config_file_compiles_only_with_a_uri_the_pods_can_read(tmp_path: Path) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(preset_path("demo").read_text() + "\nname: mine\n")
    out = tmp_path / "p.yaml"
    assert main(["compile", "--config", str(config), "--out", str(out)]) == 2
    assert not out.exists()
    uri = "/etc/safe-rlhf-v/config/mine.yaml"
    args = [
        "compile",
        "--config",
        str(config),
        "--config-uri",
        uri,
        "--set",
        "ablations=[]",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    params = next(yaml.safe_load_all(out.read_text()))["root"]["inputDefinitions"]["parameters"]
    assert params["config"]["defaultValue"] == uri
    assert params["config_overrides"]["defaultValue"] == ["ablations=[]"]


def test_resolve_config_reads_presets_files_and_s3(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    import boto3

    demo = load_config(preset_path("demo"))
    assert resolve_config("demo") == demo == resolve_config("demo.yaml")
    file = tmp_path / "c.yaml"
    file.write_text(preset_path("demo").read_text())
    assert resolve_config(str(file), ["train_reward.train.epochs=1"]).train_reward.train.epochs == 1
    boto3.client("s3", endpoint_url=s3_env).put_object(Bucket=s3_bucket, Key="c.yaml", Body=file.read_bytes())
    assert resolve_config(f"s3://{s3_bucket}/c.yaml") == demo
    with pytest.raises(ConfigError, match=f"s3://{s3_bucket}/c.yaml.*prefernce"):
        resolve_config(f"s3://{s3_bucket}/c.yaml", ["validate_data.prefernce_mostly=0.9"])
    with pytest.raises(ConfigError, match="config 'llava-7b' is neither a preset"):
        resolve_config("llava-7b")
