"""Batches on the training device, and evaluation sharded over ranks then gathered back exactly."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.distributed as tdist

from safe_rlhf_v.train.distributed import Engine

PADDING = -1
"""The row index that fills up a rank's last evaluation batch (its results are dropped)."""


def on_device(inputs: Mapping[str, torch.Tensor], engine: Engine) -> dict[str, torch.Tensor]:
    """Model inputs on the engine's device, floating ones (pixel values) in the engine's dtype."""
    moved = {key: value.to(engine.dist.device) for key, value in inputs.items()}
    return {
        key: value.to(engine.dtype) if value.is_floating_point() else value for key, value in moved.items()
    }


def eval_shards(rows: int, batch_size: int, engine: Engine) -> list[list[int]]:
    """This rank's evaluation batches over `rows` rows, padded with `PADDING` so that every rank runs
    as many batches (ZeRO-3 gathers parameters collectively: ranks must run the same forward passes)."""
    rank, world = engine.dist.rank, engine.dist.world_size
    mine = list(range(rank, rows, world))
    mine += [PADDING] * (math.ceil(rows / world) - len(mine))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's (n, k) table stacked in rank order (equal n on every rank: see `eval_shards`)."""
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, local)
    return torch.cat(parts)
