"""Loss functions of Safe RLHF-V, each a direct transcription of its formula.

Conventions: scores are per pair, shape (B,); every loss is the batch mean. Losses for the PPO
stage join this module when that stage exists.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

CostSignMode = Literal["binary", "rate"]


def reward_loss(better: torch.Tensor, worse: torch.Tensor, reg: float = 0.001) -> torch.Tensor:
    """Bradley-Terry on helpfulness: `-log sigmoid(r_better - r_worse) + reg * mean(r^2)`.

    The L2 term keeps scores near zero so that the reward scale stays comparable across runs (PPO's
    score clipping and KL coefficient assume it).
    """
    pairwise = -F.logsigmoid(better - worse).mean()
    return pairwise + reg * torch.cat([better, worse]).pow(2).mean()


def cost_signs(is_safe: torch.Tensor, harmless_rate: torch.Tensor, mode: CostSignMode) -> torch.Tensor:
    """The target sign `s` of each response's cost (cost should have the sign of `s`).

    `binary` (Safe RLHF): +1 for a harmful response, -1 for a safe one. `rate` (the Safe RLHF-V
    code): `s = -harmless_rate`, so the rate's magnitude scales the logit and a rate of 0 (a bare
    refusal) contributes a constant `log 2` with no gradient.
    """
    if mode == "binary":
        return torch.where(is_safe, -1.0, 1.0).to(torch.float32)
    if mode == "rate":
        return (-harmless_rate).to(torch.float32)
    raise ValueError(f"cost sign mode must be 'binary' or 'rate', got {mode!r}")


def cost_loss(
    unsafer: torch.Tensor,
    safer: torch.Tensor,
    sign_unsafer: torch.Tensor,
    sign_safer: torch.Tensor,
    reg: float = 0.001,
) -> torch.Tensor:
    """Cost model loss: the pairwise order plus a sign term per response.

    `-log sigmoid(c_unsafer - c_safer) - log sigmoid(s_unsafer * c_unsafer)
     - log sigmoid(s_safer * c_safer) + reg * mean(c^2)`; the sign terms anchor cost 0 as the boundary
    between harmful and safe, which the PPO budget `J_C <= d` relies on.
    """
    pairwise = -F.logsigmoid(unsafer - safer).mean()
    signs = -F.logsigmoid(sign_unsafer * unsafer).mean() - F.logsigmoid(sign_safer * safer).mean()
    return pairwise + signs + reg * torch.cat([unsafer, safer]).pow(2).mean()
