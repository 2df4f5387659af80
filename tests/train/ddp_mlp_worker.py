"""Worker launched by `torchrun --nproc_per_node 2` in test_distributed.py (not a test itself).

Each rank starts from a differently seeded MLP and sees its own half of a fixed regression set, so
ranks only agree at the end if DeepSpeed broadcast the initial weights and averaged the gradients.
After training it saves a checkpoint, resumes it into a fresh Engine and reports, per rank:
`rank<R>.safetensors` (trained weights) and `rank<R>.json` (global losses, resume results).
Arguments: the output folder and the ZeRO stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from mlp_training import KEY
from safetensors.torch import save_file
from torch import nn

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.train.checkpoint import Checkpointer
from safe_rlhf_v.train.distributed import Engine, all_reduce_mean, init_distributed, seed_everything

STEPS = 30
BATCH = 8


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(128, 4, generator=generator)
    y = torch.tanh(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]]))
    return x, y


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()}


def main(out: Path, zero_stage: int) -> None:
    info = init_distributed()
    cfg = TrainConfig(
        zero_stage=zero_stage,
        per_device_batch_size=BATCH,
        learning_rate=3e-2,
        lr_scheduler="constant_with_warmup",
        warmup_ratio=0.0,
        epochs=1,
        keep_checkpoints=1,
    )
    x, y = regression_data()
    x, y = x[info.rank :: info.world_size], y[info.rank :: info.world_size]
    seed_everything(0, info.rank)
    engine = Engine(mlp(), cfg, total_steps=STEPS, name="ddp-mlp")
    losses = []
    for step in range(STEPS):
        start = (step * BATCH) % len(x)
        loss = nn.functional.mse_loss(engine(x[start : start + BATCH]), y[start : start + BATCH])
        losses.append(all_reduce_mean(loss))
        engine.backward_and_step(loss)
    trained = weights(engine)
    checkpoints = Checkpointer(out / "ckpt", key=KEY, fingerprint={}, keep=1)
    folder = checkpoints.save(STEPS, {"mlp": engine}, {"position": {"epoch": 1, "batches_done": 0}})

    seed_everything(99, info.rank)
    fresh = Engine(mlp(), cfg, total_steps=STEPS, name="ddp-mlp-resumed")
    state = checkpoints.restore({"mlp": fresh})
    resumed = weights(fresh)
    save_file(trained, str(out / f"rank{info.rank}.safetensors"))
    report = {
        "losses": losses,
        "checkpoint": folder.name,
        "state": state,
        "resumed_step": fresh.global_step,
        "resume_max_abs_diff": max(float((resumed[k] - trained[k]).abs().max()) for k in trained),
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(report), encoding="utf-8")
    print(f"rank {info.rank} of {info.world_size} done, losses {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
