"""The reward model (RM-V): which answer is more helpful (`more_helpful_response_id`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safe_rlhf_v.data.collate import PreferenceBatch
from safe_rlhf_v.models.score import ScoreKind
from safe_rlhf_v.train.losses import reward_loss
from safe_rlhf_v.train.preference import EvalTable, score_stats


@dataclass(frozen=True)
class RewardObjective:
    """Bradley-Terry on helpfulness with a small L2 pull of the scores towards 0."""

    regularization: float = 0.001
    kind: ScoreKind = "reward"

    def loss(self, first: torch.Tensor, second: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
        scores = torch.stack([first, second], dim=1)
        better = scores.gather(1, batch.more_helpful.to(scores.device).view(-1, 1)).squeeze(1)
        worse = scores.gather(1, (1 - batch.more_helpful).to(scores.device).view(-1, 1)).squeeze(1)
        return reward_loss(better, worse, self.regularization)

    def metrics(self, table: EvalTable) -> dict[str, float]:
        """accuracy: the more helpful answer scored higher; plus the reward of safe and harmful answers."""
        better = table.pick(table.more_helpful)
        worse = table.pick(1 - table.more_helpful)
        return {
            "accuracy": float((better > worse).double().mean()),
            "pairs": float(len(better)),
            **score_stats("reward", table.scores.flatten(), ~table.is_safe.flatten()),
        }
