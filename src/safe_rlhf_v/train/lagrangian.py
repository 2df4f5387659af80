"""The Lagrange multiplier of Safe RLHF-V: how hard the harm budget pushes back.

The objective is `max_theta min_{lambda >= 0} J_R(theta) - lambda * (J_C(theta) - d)`. Lambda rises
while the expected cost `J_C` (the mean of the last `window` episode costs, averaged over ranks)
exceeds the budget `d`, and falls when it is under. Two update rules, selectable:

- `log` (the align-anything / Safe RLHF-V code): gradient ascent on log(lambda),
  `log lambda <- log lambda + lr * lambda * (J_C - d)`, capped at `lambda_max` (lambda stays > 0).
- `projected` (the paper's equation): `lambda <- clip(lambda + lr * (J_C - d), 0, lambda_max)`.

`fixed` keeps lambda at its initial value (an ablation; `reward-only` is fixed at 0).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any, Literal

LambdaRule = Literal["log", "projected", "fixed"]
# align-anything clamps the log-lambda "loss" to +-1e6 so one absurd cost cannot blow lambda up.
_MAX_LOG_STEP = 1e6


class LagrangeMultiplier:
    """Lambda, the episode-cost window it is driven by, and its update rule."""

    def __init__(
        self,
        *,
        init: float,
        maximum: float,
        lr: float,
        threshold: float,
        rule: LambdaRule,
        window: int,
        delay_steps: int = 0,
    ) -> None:
        if not 0.0 <= init <= maximum:
            raise ValueError(f"lambda init {init} must lie in [0, lambda_max={maximum}]")
        if rule == "log" and init <= 0.0:
            raise ValueError(
                "the log rule needs lambda init > 0 (log 0 is undefined); use 'projected' or 'fixed'"
            )
        if window < 1:
            raise ValueError(f"episode cost window must be >= 1, got {window}")
        self.value = float(init)
        self.maximum = float(maximum)
        self.lr = float(lr)
        self.threshold = float(threshold)
        self.rule = rule
        self.delay_steps = delay_steps
        self.costs: deque[float] = deque(maxlen=window)

    def record(self, episode_costs: Iterable[float]) -> None:
        """Add this rank's newest episode costs to the sliding window."""
        self.costs.extend(float(c) for c in episode_costs)

    def local_mean_cost(self) -> float:
        """This rank's window mean (the caller averages it over ranks to get J_C)."""
        if not self.costs:
            raise ValueError("no episode cost recorded yet: record a rollout's costs before updating lambda")
        return sum(self.costs) / len(self.costs)

    def update(self, expected_cost: float, step: int) -> float:
        """Move lambda given J_C (already reduced over ranks) at training step `step`; returns lambda."""
        if self.rule == "fixed" or step < self.delay_steps:
            return self.value
        violation = expected_cost - self.threshold
        if self.rule == "log":
            log_step = max(-_MAX_LOG_STEP, min(_MAX_LOG_STEP, self.lr * self.value * violation))
            self.value = math.exp(min(math.log(self.value) + log_step, math.log(self.maximum)))
        else:
            self.value = min(max(self.value + self.lr * violation, 0.0), self.maximum)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state for checkpoints: lambda and the cost window (resume must not reset them)."""
        return {"value": self.value, "costs": list(self.costs), "rule": self.rule}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("rule") != self.rule:
            raise ValueError(
                f"checkpoint lambda rule {state.get('rule')!r} differs from the configured {self.rule!r}"
            )
        self.value = float(state["value"])
        self.costs.clear()
        self.costs.extend(float(c) for c in state["costs"])
