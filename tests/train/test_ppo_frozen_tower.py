"""`actor_freeze_vision_tower`: PPO trains the actor's projector and language model, not its tower."""

from __future__ import annotations

from pathlib import Path

import torch
from mlp_training import KEY
from transformers import AutoModelForImageTextToText

from safe_rlhf_v.config import PPOStageConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.data.synthetic import corpus, generate_records
from safe_rlhf_v.models.tiny import build_tiny_vlm
from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels, freeze_vision_tower


def test_a_frozen_actor_tower_keeps_its_weights_while_the_projector_trains(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    train = {"epochs": 1, "per_device_batch_size": 2, "learning_rate": 1e-3, "precision": "fp32"}
    cfg = PPOStageConfig.model_validate(
        {
            "actor": train | {"max_steps": 3},
            "critic": train,
            "generation": {"max_new_tokens": 4},
            "prompt_batch_size": 2,
            "actor_freeze_vision_tower": True,
        }
    )
    run = PPOLagrangianTrainer(
        cfg,
        ppo_models,
        load_split(str(demo_data), "train").select(range(6)),
        variant="safe-rlhf-v",
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_key=KEY,
    )
    before = {k: v.clone() for k, v in run.roles.actor.module.state_dict().items()}
    run.train()
    after = run.roles.actor.module.state_dict()
    tower = [k for k in before if ".vision_tower." in k]
    projector = [k for k in before if ".multi_modal_projector." in k]
    assert tower and projector
    assert all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in projector)


def test_freezing_a_qwen_tower_leaves_its_patch_merger_trainable(tmp_path: Path) -> None:
    """Qwen-VL's projector (the merger) sits inside `visual`; it trains, as in the score stages."""
    texts = corpus(generate_records(40, seed=0))
    model = AutoModelForImageTextToText.from_pretrained(
        build_tiny_vlm(tmp_path / "qwen", texts, family="qwen2_vl")
    )
    freeze_vision_tower(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    visual = [name for name, _ in model.named_parameters() if ".visual." in name]
    assert visual
    assert {name for name in visual if name in trainable} == {n for n in visual if ".visual.merger." in n}
    assert any(".language_model." in name for name in trainable)
