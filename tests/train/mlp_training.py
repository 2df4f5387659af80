"""A small MLP regression problem for the engine, checkpoint and loop tests (no VLM, so they are fast).

Imported by the test modules of this folder and by `ddp_mlp_worker.py` (not a test itself).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.train.distributed import Engine

BATCH = 8
KEY = b"test-checkpoint-key-of-32-bytes!"


def regression(rows: int = 64, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed smooth regression problem that a small MLP fits quickly."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, generator=generator)
    return x, torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))


def mlp(dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def config(**overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "per_device_batch_size": BATCH,
        "learning_rate": 2e-2,
        "lr_scheduler": "constant_with_warmup",
        "warmup_ratio": 0.0,
        "epochs": 1,
    }
    return TrainConfig(**(base | overrides))


def run_steps(engine: Engine, data: tuple[torch.Tensor, torch.Tensor], steps: range) -> list[float]:
    """Optimizer steps `steps` (GA 1), batch i always the same slice, so runs are comparable."""
    x, y = data
    losses = []
    for step in steps:
        start = (step * BATCH) % len(x)
        loss = nn.functional.mse_loss(engine(x[start : start + BATCH]), y[start : start + BATCH])
        losses.append(loss.item())
        assert engine.backward_and_step(loss)
    return losses


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@dataclass
class RegressionTask:
    """The loop's task on the regression rows: MSE of a batch, MSE over every row as the evaluation."""

    x: torch.Tensor
    y: torch.Tensor
    name: str = "mlp"

    def losses(self, engine: Engine, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = torch.tensor(indices)
        return {"loss": nn.functional.mse_loss(engine(self.x[rows]), self.y[rows])}

    def evaluate(self, engine: Engine) -> dict[str, float]:
        engine.ds.eval()  # as the real tasks: no dropout, so evaluating draws nothing from the RNG
        with torch.no_grad():
            mse = float(nn.functional.mse_loss(engine(self.x), self.y))
        engine.ds.train()
        return {"mse": mse}
