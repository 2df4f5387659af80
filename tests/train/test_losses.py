"""Each loss against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from safe_rlhf_v.train.losses import cost_loss, cost_signs, reward_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_reward_loss_matches_hand_computation() -> None:
    better = torch.tensor([1.0, 0.5])
    worse = torch.tensor([0.0, 1.5])
    pairwise = -(log_sigmoid(1.0) + log_sigmoid(-1.0)) / 2
    l2 = (1.0 + 0.25 + 0.0 + 2.25) / 4
    expected = pairwise + 0.001 * l2
    assert reward_loss(better, worse).item() == pytest.approx(expected, rel=1e-6)
    assert reward_loss(better, worse, reg=0.0).item() == pytest.approx(pairwise, rel=1e-6)


def test_reward_loss_gradient_pushes_better_up() -> None:
    better = torch.tensor([0.0], requires_grad=True)
    worse = torch.tensor([0.0], requires_grad=True)
    reward_loss(better, worse, reg=0.0).backward()
    assert better.grad.item() == pytest.approx(-0.5)
    assert worse.grad.item() == pytest.approx(0.5)


def test_binary_cost_loss_matches_hand_computation() -> None:
    # pair 0: unsafer harmful (cost 2.0), safer safe (cost -1.0); pair 1: both safe.
    unsafer = torch.tensor([2.0, 0.5])
    safer = torch.tensor([-1.0, 0.2])
    is_safe = torch.tensor([[False, True], [True, True]])  # columns: unsafer, safer
    rates = torch.tensor([[-2, 3], [0, 1]])
    s_unsafer = cost_signs(is_safe[:, 0], rates[:, 0], "binary")
    s_safer = cost_signs(is_safe[:, 1], rates[:, 1], "binary")
    assert s_unsafer.tolist() == [1.0, -1.0]
    assert s_safer.tolist() == [-1.0, -1.0]
    pairwise = -(log_sigmoid(3.0) + log_sigmoid(0.3)) / 2
    sign_unsafer = -(log_sigmoid(2.0) + log_sigmoid(-0.5)) / 2
    sign_safer = -(log_sigmoid(1.0) + log_sigmoid(-0.2)) / 2
    l2 = (4.0 + 0.25 + 1.0 + 0.04) / 4
    expected = pairwise + sign_unsafer + sign_safer + 0.001 * l2
    assert cost_loss(unsafer, safer, s_unsafer, s_safer).item() == pytest.approx(expected, rel=1e-6)


def test_rate_cost_signs_scale_logits_and_zero_rate_has_no_gradient() -> None:
    rates = torch.tensor([-3, 0, 2])
    signs = cost_signs(torch.tensor([False, True, True]), rates, "rate")
    assert signs.tolist() == [3.0, 0.0, -2.0]
    unsafer = torch.tensor([0.5, 0.7, 0.1], requires_grad=True)
    safer = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    safe_signs = torch.tensor([-1.0, -1.0, -1.0])
    loss = cost_loss(unsafer, safer, signs, safe_signs, reg=0.0)
    pairwise = -(log_sigmoid(0.5) + log_sigmoid(0.7) + log_sigmoid(0.1)) / 3
    sign_unsafer = -(log_sigmoid(1.5) + log_sigmoid(0.0) + log_sigmoid(-0.2)) / 3
    sign_safer = -(3 * log_sigmoid(0.0)) / 3
    assert loss.item() == pytest.approx(pairwise + sign_unsafer + sign_safer, rel=1e-6)
    # Rate 0: the sign term is the constant log 2, so only the pairwise term moves that row.
    loss.backward()
    pairwise_grad = -(1 - 1 / (1 + math.exp(-0.7))) / 3
    assert unsafer.grad[1].item() == pytest.approx(pairwise_grad, rel=1e-5)


def test_unknown_sign_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="cost sign mode"):
        cost_signs(torch.tensor([True]), torch.tensor([1]), "sigmoid")  # type: ignore[arg-type]
