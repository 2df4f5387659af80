"""The rollout-engine seam: the trainer samples only through its engine and tells it after every
step's actor updates; the Hugging Face engine's behaviour log-probs are the actor's own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlp_training import KEY
from transformers import AutoModelForImageTextToText, AutoProcessor

from safe_rlhf_v.config import GenerationConfig, PPOStageConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels
from safe_rlhf_v.train.rollout import Samples, response_logits, token_log_probs
from safe_rlhf_v.train.rollout_engine import HFEngine, PromptBatch, RolloutEngine


class RecordingEngine:
    """Wraps the trainer's engine and records, per call, the actor's optimizer step count."""

    def __init__(self, inner: RolloutEngine, trainer: PPOLagrangianTrainer) -> None:
        self.inner, self.trainer = inner, trainer
        self.samples: list[int] = []
        self.updates: list[int] = []

    def sample(self, batch: PromptBatch) -> Samples:
        self.samples.append(self.trainer.roles.actor.global_step)
        return self.inner.sample(batch)

    def update_weights(self, model: torch.nn.Module) -> None:
        assert model is self.trainer.roles.actor.module
        self.updates.append(self.trainer.roles.actor.global_step)
        self.inner.update_weights(model)

    def close(self) -> None:
        self.inner.close()


def _config(**ppo: object) -> PPOStageConfig:
    train = {"epochs": 1, "per_device_batch_size": 2, "learning_rate": 1e-4, "precision": "fp32"}
    return PPOStageConfig.model_validate(
        {
            "actor": train | {"max_steps": 3},
            "critic": train,
            "generation": {"max_new_tokens": 4},
            "prompt_batch_size": 2,
        }
        | ppo
    )


def _trainer(cfg: PPOStageConfig, ppo_models: PPOModels, demo_data: Path, ckpt: Path) -> PPOLagrangianTrainer:
    prompts = load_split(str(demo_data), "train").select(range(8))
    return PPOLagrangianTrainer(
        cfg, ppo_models, prompts, variant="safe-rlhf-v", checkpoint_dir=ckpt, checkpoint_key=KEY
    )


@pytest.mark.parametrize("update_iters", [1, 2])
def test_the_trainer_samples_through_its_engine_and_updates_it_once_per_step(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path, update_iters: int
) -> None:
    """Each step samples once before its actor updates and calls update_weights once after all of
    them (two optimizer steps a PPO step with update_iters=2), never in between."""
    run = _trainer(_config(update_iters=update_iters), ppo_models, demo_data, tmp_path / "ckpt")
    assert isinstance(run.engine, HFEngine)
    recorder = RecordingEngine(run.engine, run)
    run.engine = recorder
    run.train()
    steps = [update_iters * step for step in range(1, 4)]
    assert recorder.updates == steps
    assert recorder.samples == [0, *steps[:-1]], "each rollout samples after the previous step's update"


def test_a_resumed_run_pushes_the_restored_weights_to_its_engine(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    """A run stopped after step 2 (its step-3 checkpoint gone) resumes: the engine first gets the
    restored weights, then the weights after the one step left."""
    ckpt = tmp_path / "ckpt"
    cfg = _config()
    cfg = cfg.model_copy(update={"actor": cfg.actor.model_copy(update={"checkpoint_every_steps": 2})})
    _trainer(cfg, ppo_models, demo_data, ckpt).train()
    shutil.rmtree(ckpt / "step-3")
    resumed = _trainer(cfg, ppo_models, demo_data, ckpt)
    recorder = RecordingEngine(resumed.engine, resumed)
    resumed.engine = recorder
    resumed.train()
    assert recorder.updates == [2, 3]
    assert recorder.samples == [2]


def test_hf_engine_refuses_a_module_it_does_not_sample_with(tiny_model: Path) -> None:
    actor = AutoModelForImageTextToText.from_pretrained(tiny_model)
    engine = HFEngine(
        actor,
        AutoProcessor.from_pretrained(tiny_model),
        GenerationConfig(max_new_tokens=2),
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    engine.update_weights(actor)
    with pytest.raises(ValueError, match="samples with the module it was built with"):
        engine.update_weights(AutoModelForImageTextToText.from_pretrained(tiny_model))


def test_hf_engine_log_probs_are_a_fresh_forward_of_the_actor(tiny_model: Path, demo_data: Path) -> None:
    """The behaviour log-probs the engine returns are the actor's log-probs of the sampled tokens, as
    a full forward over prompt + answer computes them (fp32, KV cache against none), and zero after
    each answer's end; the actor is back in train mode afterwards."""
    actor = AutoModelForImageTextToText.from_pretrained(tiny_model).train()
    engine = HFEngine(
        actor,
        AutoProcessor.from_pretrained(tiny_model),
        GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1.0),
        device=torch.device("cpu"),
        dtype=torch.float32,
        cpu_threads=1,
    )
    rows = [load_split(str(demo_data), "train")[i] for i in range(3)]
    torch.manual_seed(0)
    samples = engine.sample(PromptBatch.from_rows(rows))
    assert actor.training
    assert samples.log_probs is not None
    inputs, start, mask = samples.inputs, samples.prompt_length, samples.response_mask
    assert mask.shape == samples.log_probs.shape == (3, inputs["input_ids"].shape[1] - start)
    actor.eval()
    with torch.no_grad():
        fresh = token_log_probs(response_logits(actor, inputs, start), inputs["input_ids"][:, start:])
    torch.testing.assert_close(samples.log_probs, fresh * mask, rtol=0, atol=1e-5)
    assert (samples.log_probs[mask == 0] == 0).all()
