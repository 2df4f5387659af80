"""Reward and cost training end to end on the tiny model: ZeRO-2, torchrun, resume, the stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from mlp_training import KEY

from safe_rlhf_v.cli import main
from safe_rlhf_v.config import TrainConfig, load_config
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.lineage import NotValidatedData, read_lineage, validated_dataset_uri
from safe_rlhf_v.models.score import ScoreModel
from safe_rlhf_v.stages import train_score
from safe_rlhf_v.train.checkpoint import STATE
from safe_rlhf_v.train.cost import CostObjective
from safe_rlhf_v.train.distributed import find_free_port
from safe_rlhf_v.train.loop import TrainingResult
from safe_rlhf_v.train.preference import PreferenceSettings, train_preference_model
from safe_rlhf_v.train.reward import RewardObjective


def settings(model: Path, **train: object) -> PreferenceSettings:
    base = {
        "epochs": 1,
        "per_device_batch_size": 8,
        "learning_rate": 2e-3,
        "precision": "fp32",
        "log_every_steps": 1,
    }
    return PreferenceSettings(
        base_model=str(model),
        train=TrainConfig.model_validate(base | train),
        max_length=192,
        eval_batch_size=16,
        freeze_vision_tower=True,
        freeze_projector=False,
        min_response_tokens=8,
    )


def splits(validated: Path) -> dict:
    return {
        split: load_split(validated_dataset_uri(str(validated)), split) for split in ("train", "evaluation")
    }


def test_reward_training_under_zero2_lowers_the_loss(
    tmp_path: Path, tiny_model: Path, validated_data: Path
) -> None:
    data = splits(validated_data)
    losses: list[float] = []
    metrics = train_preference_model(
        RewardObjective(),
        settings(tiny_model, zero_stage=2, epochs=3),
        train=data["train"],
        evaluation=data["evaluation"],
        out_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_key=KEY,
        sink=lambda values, step: losses.append(values["train/loss"]) if "train/loss" in values else None,
    ).metrics
    assert len(losses) == 30  # 80 pairs / 8 per batch x 3 epochs, logged every step
    assert sum(losses[-5:]) / 5 < 0.7 * (sum(losses[:5]) / 5), losses
    assert metrics["accuracy"] > 0.75, metrics  # chance is 0.5
    reloaded = ScoreModel.load(str(tmp_path / "model"))
    assert reloaded.kind == "reward"


def test_cost_training_learns_the_sign(tmp_path: Path, tiny_model: Path, validated_data: Path) -> None:
    data = splits(validated_data)
    metrics = train_preference_model(
        CostObjective(sign_mode="binary"),
        settings(tiny_model, epochs=3),
        train=data["train"],
        evaluation=data["evaluation"],
        out_dir=None,
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_key=KEY,
    ).metrics
    assert metrics["pairwise_accuracy"] > 0.75, metrics
    assert metrics["sign_accuracy"] > 0.75, metrics


def test_a_run_resumed_at_max_steps_takes_no_extra_step_and_a_longer_one_goes_on(
    tmp_path: Path, tiny_model: Path, validated_data: Path
) -> None:
    """The cap is checked before a step, not after: resuming a run that reached `max_steps` trains
    nothing (it used to take one more optimizer step); raising the cap continues the same epoch."""
    data = splits(validated_data)
    ckpt = tmp_path / "ckpt"
    constant = {
        "epochs": 2,
        "checkpoint_every_steps": 2,
        "lr_scheduler": "constant_with_warmup",
        "warmup_ratio": 0.0,
    }

    def run(max_steps: int) -> tuple[list[int], TrainingResult]:
        steps: list[int] = []
        result = train_preference_model(
            RewardObjective(),
            settings(tiny_model, max_steps=max_steps, **constant),
            train=data["train"],
            evaluation=data["evaluation"],
            out_dir=None,
            checkpoint_dir=ckpt,
            checkpoint_key=KEY,
            sink=lambda values, step: steps.append(step) if "train/loss" in values else None,
        )
        return steps, result

    first_steps, first = run(2)
    assert first_steps == [1, 2]
    assert json.loads((ckpt / "step-2" / STATE).read_text())["position"] == {"epoch": 0, "batches_done": 2}
    again_steps, again = run(2)
    assert again_steps == [], "resuming at max_steps trained on"
    assert again.metrics == first.metrics and again.history == first.history
    assert not (ckpt / "step-3").exists()
    longer_steps, longer = run(4)
    assert longer_steps == [3, 4], "training continued from the checkpoint's step, not from scratch"
    assert [r["step"] for r in longer.history if "train/loss" in r] == [1, 2, 3, 4]


def stage_config(tmp_path: Path, model: Path, **train: object) -> Path:
    tree = {
        "work_dir": str(tmp_path / "work"),
        "data": {"uri": "unused"},
        "base_model": str(model),
        "tracking": {"experiment": "stage-test"},
        "train_reward": {
            "max_length": 192,
            "train": {"epochs": 2, "per_device_batch_size": 4, "learning_rate": 2e-3, "log_every_steps": 1}
            | train,
        },
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_stage_records_lineage_and_metrics(tmp_path: Path, tiny_model: Path, validated_data: Path) -> None:
    cfg = load_config(stage_config(tmp_path, tiny_model, max_steps=3))
    out = tmp_path / "reward-model"
    result = train_score.run("train-reward", cfg, str(validated_data), str(out), pipeline_run_id="run-42")
    lineage = read_lineage(str(out))
    recorded = json.loads((validated_data / "result.json").read_text())["details"]
    assert lineage.data_sha256["train"] == recorded["train_sha256"]
    assert lineage.base_model == str(tiny_model)
    assert lineage.pipeline_run_id == "run-42"
    assert "accuracy" in result.metrics
    run = MlflowClient().get_run(result.mlflow_run_id)
    assert run.data.params["train-reward.train.learning_rate"] == "0.002"
    assert run.data.tags["model.input.base_model.uri"] == str(tiny_model)
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {
        "beavertails-v/train",
        "beavertails-v/evaluation",
    }


def test_stage_refuses_unvalidated_data(tmp_path: Path, tiny_model: Path, demo_data: Path) -> None:
    cfg = load_config(stage_config(tmp_path, tiny_model))
    with pytest.raises(NotValidatedData, match="is not a validate-data output"):
        train_score.run("train-reward", cfg, str(demo_data), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_two_process_torchrun_training_lowers_the_loss(
    tmp_path: Path, tiny_model: Path, validated_data: Path
) -> None:
    config = stage_config(tmp_path, tiny_model, epochs=3, zero_stage=2)
    out = tmp_path / "reward-model"
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_RUN_ID")
    }
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        "-m", "safe_rlhf_v.cli", "train-reward",
        "--config", str(config), "--data", str(validated_data), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 24  # the evaluation gathered every rank's share exactly once
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = read_lineage(str(out)).mlflow_run_id
    history = [m.value for m in client.get_metric_history(run_id, "train/loss")]
    assert len(history) == 30  # 80 pairs / (4 per rank x 2 ranks) = 10 steps an epoch, 3 epochs
    assert sum(history[-4:]) / 4 < sum(history[:4]) / 4, history


def test_a_changed_config_under_the_same_pipeline_run_refuses_to_resume(
    tmp_path: Path, tiny_model: Path, validated_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A retry of the same pipeline run with another learning rate used to resume the old checkpoint
    silently and publish its weights; now it stops with one line naming what changed, publishes
    nothing, and goes on only when told to."""
    config = stage_config(tmp_path, tiny_model, max_steps=2)
    common = ["--config", str(config), "--data", str(validated_data), "--pipeline-run-id", "run-7"]
    assert main(["train-reward", *common, "--out", str(tmp_path / "first")]) == 0
    capsys.readouterr()
    changed = [*common, "--set", "train_reward.train.learning_rate=0.01"]
    assert main(["train-reward", *changed, "--out", str(tmp_path / "second")]) == 2
    printed = capsys.readouterr().err.strip().splitlines()  # progress bars, then the error
    error = printed[-1]
    assert error.startswith("error: refusing to resume") and "Traceback" not in "".join(printed)
    assert "reward.learning_rate (0.002 -> 0.01)" in error
    assert not (tmp_path / "second").exists()
    override = ["--set", "train_reward.train.resume_with_changed_config=true"]
    assert main(["train-reward", *changed, *override, "--out", str(tmp_path / "second")]) == 0
    assert (tmp_path / "second" / "metrics.json").is_file()
