"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from safe_rlhf_v.models.score import ScoreModel
from safe_rlhf_v.train.ppo_lagrangian import PPOModels


@pytest.fixture(scope="session")
def ppo_models(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> PPOModels:
    """The six PPO roles on the tiny model: reward and cost heads (seeded) saved once, the critics
    starting from them."""
    root = tmp_path_factory.mktemp("score-models")
    processor = AutoProcessor.from_pretrained(tiny_model)
    for kind in ("reward", "cost"):
        torch.manual_seed(1 if kind == "reward" else 2)
        ScoreModel.from_base(str(tiny_model), kind).save(root / kind, processor=processor)
    return PPOModels.critics_from_scores(str(tiny_model), str(root / "reward"), str(root / "cost"))
