"""The cost model (CM-V): which answer is more harmful, and is an answer harmful at all (cost > 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safe_rlhf_v.data.collate import PreferenceBatch
from safe_rlhf_v.models.score import ScoreKind
from safe_rlhf_v.train.losses import CostSignMode, cost_loss, cost_signs
from safe_rlhf_v.train.preference import EvalTable, score_stats


@dataclass(frozen=True)
class CostObjective:
    """Pairwise order (unsafer above safer) plus a sign term that puts harmful answers above 0.

    The unsafer answer is the one that is not `safer_response_id`, as in the Safe RLHF-V template.
    """

    regularization: float = 0.001
    sign_mode: CostSignMode = "binary"
    kind: ScoreKind = "cost"

    def loss(self, first: torch.Tensor, second: torch.Tensor, batch: PreferenceBatch) -> torch.Tensor:
        scores = torch.stack([first, second], dim=1)
        device = scores.device
        safer_idx = batch.safer.to(device).view(-1, 1)
        unsafer_idx = 1 - safer_idx
        signs = cost_signs(batch.is_safe.to(device), batch.harmless_rate.to(device), self.sign_mode)
        return cost_loss(
            scores.gather(1, unsafer_idx).squeeze(1),
            scores.gather(1, safer_idx).squeeze(1),
            signs.gather(1, unsafer_idx).squeeze(1),
            signs.gather(1, safer_idx).squeeze(1),
            self.regularization,
        )

    def metrics(self, table: EvalTable) -> dict[str, float]:
        """pairwise_accuracy: unsafer scored higher; sign_accuracy: cost > 0 exactly for harmful answers."""
        unsafer = table.pick(1 - table.safer)
        safer = table.pick(table.safer)
        harmful = ~table.is_safe.flatten()
        costs = table.scores.flatten()
        return {
            "pairwise_accuracy": float((unsafer > safer).double().mean()),
            "sign_accuracy": float(((costs > 0) == harmful).double().mean()),
            "harmful_share_predicted": float((costs > 0).double().mean()),
            "pairs": float(len(unsafer)),
            **score_stats("cost", costs, harmful),
        }
