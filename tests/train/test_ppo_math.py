"""PPO-Lagrangian pieces against hand computations: shaping, GAE, advantages, losses, lambda."""

from __future__ import annotations

import math

import pytest
import torch

from safe_rlhf_v.train.lagrangian import LagrangeMultiplier
from safe_rlhf_v.train.losses import (
    combined_advantage,
    critic_loss,
    gae,
    masked_mean,
    ppo_actor_loss,
    shaped_rewards,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # row 0: 3 response tokens; row 1: 1, then padding


def test_shaped_rewards_put_the_clipped_score_on_the_last_real_token() -> None:
    kl = torch.tensor([[0.5, -1.0, 2.0], [1.0, 9.0, 9.0]])
    reward = shaped_rewards(kl, torch.tensor([60.0, -2.0]), MASK, beta=0.1, clip=50.0, sign=-1.0)
    expected = torch.tensor([[-0.05, 0.1, -0.2 + 50.0], [-0.1 - 2.0, 0.0, 0.0]])
    assert torch.allclose(reward, expected)
    cost = shaped_rewards(kl, torch.tensor([1.0, 3.0]), MASK, beta=0.1, clip=50.0, sign=1.0)
    assert torch.allclose(cost, torch.tensor([[0.05, -0.1, 0.2 + 1.0], [0.1 + 3.0, 0.0, 0.0]]))


def test_shaped_rewards_reject_an_empty_response() -> None:
    with pytest.raises(ValueError, match="at least one response token"):
        shaped_rewards(torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 2), beta=0.1, clip=5.0, sign=1.0)


def test_gae_by_hand_with_a_mask() -> None:
    rewards = torch.tensor([[0.1, 0.2, 1.0], [0.5, 7.0, 7.0]])
    values = torch.tensor([[0.3, 0.4, 0.5], [0.2, 9.0, 9.0]])
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards * MASK, values, MASK, gamma, lam)
    # row 0, backwards: delta_2 = 1.0 - 0.5; delta_1 = 0.2 + 0.9*0.5 - 0.4; delta_0 = 0.1 + 0.9*0.4 - 0.3
    d2, d1, d0 = 0.5, 0.25, 0.16
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2], abs=1e-6)
    assert returns[0].tolist() == pytest.approx([a0 + 0.3, a1 + 0.4, a2 + 0.5], abs=1e-6)
    # row 1: one token, its next value is terminal (padding values must not leak in)
    assert advantages[1].tolist() == pytest.approx([0.5 - 0.2, 0.0, 0.0], abs=1e-6)
    assert returns[1].tolist() == pytest.approx([0.5, 0.0, 0.0], abs=1e-6)


def test_combined_advantage() -> None:
    reward_adv, cost_adv = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert combined_advantage(reward_adv, cost_adv, 3.0).tolist() == pytest.approx([-0.125, -1.25])
    assert combined_advantage(reward_adv, cost_adv, 0.0).tolist() == pytest.approx([1.0, -2.0])


def test_ppo_actor_loss_clips_by_hand() -> None:
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.7, 1.1]]))
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clip_fraction = ppo_actor_loss(new, old, adv, mask, clip=0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(-1.4, -1.6) = -1.6; token 2 masked out
    assert loss.item() == pytest.approx(-(1.2 - 1.6) / 2, rel=1e-5)
    assert clip_fraction.item() == pytest.approx(1.0)


def test_critic_loss_clips_by_hand() -> None:
    values = torch.tensor([[2.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0]])
    # token 0: max((2-1)^2, (clip(2, -1.5, 1.5) - 1)^2) = max(1, 0.25) = 1; token 1: 9
    assert critic_loss(values, old, returns, mask, clip=1.5).item() == pytest.approx(0.5 * (1 + 9) / 2)
    # clipping bites: value moved far from old and away from the return
    assert critic_loss(
        torch.tensor([[5.0]]), torch.zeros(1, 1), torch.tensor([[4.0]]), torch.ones(1, 1), 1.0
    ).item() == (pytest.approx(0.5 * 9.0))


def test_masked_mean_ignores_padding() -> None:
    assert masked_mean(torch.tensor([[1.0, 100.0]]), torch.tensor([[1.0, 0.0]])).item() == 1.0


def multiplier(rule: str, init: float = 10.0, **kw: float) -> LagrangeMultiplier:
    args = {"init": init, "maximum": 20.0, "lr": 0.1, "threshold": -0.5, "rule": rule, "window": 4} | kw
    return LagrangeMultiplier(**args)  # type: ignore[arg-type]


def test_log_rule_by_hand() -> None:
    lam = multiplier("log", init=2.0)
    assert lam.update(0.5, step=1) == pytest.approx(math.exp(math.log(2.0) + 0.1 * 2.0 * 1.0))
    lam = multiplier("log", init=2.0)
    assert lam.update(-1.5, step=1) == pytest.approx(math.exp(math.log(2.0) - 0.1 * 2.0 * 1.0))
    lam = multiplier("log", init=10.0)
    assert lam.update(100.0, step=1) == pytest.approx(20.0)  # capped at lambda_max, no overflow


def test_projected_rule_by_hand() -> None:
    lam = multiplier("projected", init=1.0)
    assert lam.update(0.5, step=1) == pytest.approx(1.1)
    assert lam.update(-100.0, step=2) == 0.0  # projected onto lambda >= 0
    assert multiplier("projected", init=19.99).update(5.0, step=1) == 20.0


def test_fixed_rule_and_delay() -> None:
    assert multiplier("fixed").update(100.0, step=5) == 10.0
    delayed = multiplier("projected", init=1.0, delay_steps=2)
    assert delayed.update(10.0, step=1) == 1.0
    assert delayed.update(10.0, step=2) > 1.0


def test_cost_window_and_state_round_trip() -> None:
    lam = multiplier("log")
    lam.record([1.0, 2.0, 3.0])
    lam.record([4.0, 5.0])  # window of 4 drops the oldest
    assert lam.local_mean_cost() == pytest.approx(3.5)
    lam.update(3.5, step=1)
    restored = multiplier("log")
    restored.load_state_dict(lam.state_dict())
    assert restored.value == lam.value and list(restored.costs) == [2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="differs"):
        multiplier("projected").load_state_dict(lam.state_dict())


def test_bad_multiplier_settings() -> None:
    with pytest.raises(ValueError, match="must lie in"):
        multiplier("log", init=30.0)
    with pytest.raises(ValueError, match="log 0"):
        multiplier("log", init=0.0)
    with pytest.raises(ValueError, match="no episode cost"):
        multiplier("log").local_mean_cost()
