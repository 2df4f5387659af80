"""Loss functions of Safe RLHF-V, each a direct transcription of its formula.

Conventions: preference-model scores are per pair, shape (B,); every loss is the batch mean. The
PPO-Lagrangian pieces work on (B, T) response-token tensors with a response mask.
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


# --- PPO-Lagrangian (Safe RLHF-V). Token tensors are (B, T) over response positions; `mask` is 1 on
# the tokens the policy generated (up to and including EOS) and 0 on padding, which must never
# enter an advantage, a return or a loss.


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked-in entries (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def shaped_rewards(
    kl: torch.Tensor, end_score: torch.Tensor, mask: torch.Tensor, beta: float, clip: float, sign: float
) -> torch.Tensor:
    """Per-token signal: `sign * beta * kl_t` everywhere, plus the clipped sequence score at the last
    response token. `sign` is -1 for the reward (KL is a penalty) and +1 for the cost."""
    lengths = mask.sum(dim=1).long()
    if bool((lengths == 0).any()):
        raise ValueError("every rollout needs at least one response token (the mask has an empty row)")
    signal = sign * beta * kl * mask
    last = (lengths - 1).view(-1, 1)
    return signal.scatter_add(1, last, end_score.clamp(-clip, clip).view(-1, 1).to(signal.dtype))


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response, masked: returns (advantages, returns).

    `delta_t = r_t + gamma * V_{t+1} - V_t` with `V_{t+1} = 0` past the last response token, and
    `A_t = delta_t + gamma * lam * A_{t+1}`; padding gets advantage and return 0.
    """
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    return advantages, (advantages + values) * mask


def combined_advantage(reward_adv: torch.Tensor, cost_adv: torch.Tensor, lam: float) -> torch.Tensor:
    """The Lagrangian's advantage `(A_r - lambda * A_c) / (1 + lambda)` (lambda a constant here)."""
    return (reward_adv - lam * cost_adv) / (1.0 + lam)


def ppo_actor_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate `-mean(min(A * ratio, A * clip(ratio, 1 +- clip)))`.

    Returns the loss and the clip fraction (share of tokens whose ratio left `1 +- clip`)."""
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = advantages * ratio
    clipped = advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = -masked_mean(torch.minimum(unclipped, clipped), mask)
    clip_fraction = masked_mean(((ratio - 1.0).abs() > clip).to(log_probs.dtype), mask)
    return loss, clip_fraction


def critic_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """Clipped value loss `0.5 * mean(max((V - R)^2, (clip(V, V_old +- clip) - R)^2))`."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
