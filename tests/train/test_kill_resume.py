"""Kill-and-resume of every training stage (SFT, reward, cost, guard, PPO) with real SIGKILLs.

Each stage trains once uninterrupted, and once as a chain of attempts on one checkpoint folder: two
attempts SIGKILL themselves at seeded random points (mid-step, between an engine's save and the
state, half-way through a file, before the seal, before pruning, after the last checkpoint), then a
last attempt runs to the end. Its published weights, final metrics and history must equal the
uninterrupted run's: bitwise, since every attempt runs the same single-threaded fp32 arithmetic on
the CPU. The stages differ in ZeRO stage and gradient accumulation, so each resume path is covered.

All attempts are forks of one worker process (kill_worker.py), which imports torch and the trainers
once; the whole module takes about a minute and a half on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from safe_rlhf_v.train.ppo_lagrangian import PPOModels

WORKER = Path(__file__).with_name("kill_worker.py")
SEED = int(os.environ.get("KILL_RESUME_SEED", "20261203"))
"""Seeds the kill points; set KILL_RESUME_SEED to try others (each seed is reproducible)."""
WRITE_PHASE = ("engine", "write", "seal", "prune")


def train(**fields: object) -> dict[str, object]:
    base = {"learning_rate": 2e-3, "precision": "fp32", "log_every_steps": 1, "lr_scheduler": "cosine"}
    return base | {"warmup_ratio": 0.2, "seed": 3} | fields


# Per stage: settings, then the steps the loop's cadence checkpoints and the last step (checked
# against the uninterrupted run, so a kill point is always a real one).
STAGES: dict[str, tuple[dict[str, Any], list[int], int]] = {
    # 8 pairs = 16 rows, 4 batches of 4 an epoch, 2 epochs; ZeRO-0.
    "sft": (
        {
            "train_rows": 8,
            "eval_rows": 4,
            "train": train(epochs=2, per_device_batch_size=4, checkpoint_every_steps=3),
        },
        [3, 4, 6, 8],
        8,
    ),
    # 20 pairs, 5 batches of 4, accumulation 2, 3 epochs: 15 micro-batches, 7 steps; the first and
    # the last epoch end mid-window (no checkpoint there). ZeRO-2.
    "reward": (
        {
            "train_rows": 20,
            "eval_rows": 8,
            "train": train(
                epochs=3,
                per_device_batch_size=4,
                gradient_accumulation_steps=2,
                zero_stage=2,
                checkpoint_every_steps=2,
            ),
        },
        [2, 4, 5, 6],
        7,
    ),
    # 16 pairs, 4 batches of 4, 2 epochs; ZeRO-3 (partitioned weights and optimizer).
    "cost": (
        {
            "train_rows": 16,
            "eval_rows": 8,
            "train": train(epochs=2, per_device_batch_size=4, zero_stage=3, checkpoint_every_steps=3),
        },
        [3, 4, 6, 8],
        8,
    ),
    # 8 pairs = 16 rows, 4 batches of 4, 2 epochs, stopped by max_steps mid-epoch; ZeRO-1.
    "guard": (
        {
            "train_rows": 8,
            "eval_rows": 4,
            "train": train(
                epochs=2, per_device_batch_size=4, zero_stage=1, checkpoint_every_steps=2, max_steps=7
            ),
        },
        [2, 4, 6, 7],
        7,
    ),
    # 8 prompts, 4 rollouts of 2 an epoch, capped at 6 steps; three engines and keep_checkpoints 1
    # (the run of the issue: a kill between engines must not mix their steps).
    "ppo": (
        {
            "train_rows": 8,
            "ppo": {
                "actor": train(
                    epochs=2,
                    per_device_batch_size=2,
                    learning_rate=1e-4,
                    max_steps=6,
                    checkpoint_every_steps=2,
                    keep_checkpoints=1,
                ),
                "critic": train(
                    epochs=2, per_device_batch_size=2, learning_rate=1e-4, lr_scheduler="constant_with_warmup"
                ),
                "generation": {"max_new_tokens": 6},
                "prompt_batch_size": 2,
                "lagrangian": {
                    "rule": "log",
                    "init": 1.0,
                    "lr": 0.05,
                    "threshold": -50.0,
                    "update_delay_steps": 0,
                },
            },
        },
        [2, 4, 6],
        6,
    ),
}


def kill_points(rng: random.Random, first_kind: str, checkpointed: list[int], last: int) -> list[str]:
    """Two kill points in the order a chain reaches them: the first of `first_kind`, the second a
    random one at a later step (or after the last checkpoint)."""
    first_step = rng.randint(1, last - 1) if first_kind == "step" else rng.choice(checkpointed[:-1])
    later = [step for step in checkpointed if step > first_step]
    second = rng.choice(["step", "publish", *WRITE_PHASE])
    if second == "publish" or not later:
        return [f"{first_kind}@{first_step}", "publish"]
    if second == "step":
        return [f"{first_kind}@{first_step}", f"step@{rng.randint(first_step + 1, last)}"]
    return [f"{first_kind}@{first_step}", f"{second}@{rng.choice(later)}"]


@pytest.fixture(scope="module")
def chains(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model: Path,
    demo_data: Path,
    validated_data: Path,
    ppo_models: PPOModels,
) -> dict[str, Path]:
    """Every stage's uninterrupted run and killed chain, run once by one worker; stage -> its folder."""
    root = tmp_path_factory.mktemp("kill-resume")
    rng = random.Random(SEED)
    first_kinds = [*WRITE_PHASE, "step"]
    rng.shuffle(first_kinds)
    plans = []
    for (stage, (settings, checkpointed, last)), first_kind in zip(STAGES.items(), first_kinds, strict=True):
        folder = root / stage
        kills = kill_points(rng, first_kind, checkpointed, last)
        if stage == "ppo" and kills[-1] != "publish":
            kills.append("publish")  # the case: killed after the last checkpoint
        plan = settings | {
            "stage": stage,
            "model": str(tiny_model),
            "data": str(demo_data if stage in ("sft", "ppo") else validated_data),
            "models": dataclasses.asdict(ppo_models),
            "attempts": [{"dir": str(folder / "straight"), "kill": None}]
            + [{"dir": str(folder / "chain"), "kill": kill} for kill in [*kills, None]],
        }
        folder.mkdir()
        (folder / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
        plans.append(str(folder / "plan.json"))
    done = subprocess.run(
        [sys.executable, str(WORKER), *plans], capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {stage: root / stage for stage in STAGES}


def published(out: Path) -> dict[str, Any]:
    weights: dict[str, Any] = {}
    for file in sorted(out.glob("*.safetensors")):
        weights |= {f"{file.name}:{key}": tensor for key, tensor in load_file(file).items()}
    assert weights, f"nothing published in {out}"
    return weights


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_killed_and_resumed_run_publishes_what_an_uninterrupted_one_does(
    chains: dict[str, Path], stage: str
) -> None:
    folder = chains[stage]
    plan = json.loads((folder / "plan.json").read_text())
    kills = [attempt["kill"] for attempt in plan["attempts"][1:-1]]
    exits = json.loads((folder / "exits.json").read_text())
    assert exits == [0, *[-9] * len(kills), 0], f"every kill point ({kills}) must be reached and SIGKILL"
    straight = json.loads((folder / "straight" / "result.json").read_text())
    resumed = json.loads((folder / "chain" / "result.json").read_text())
    _, checkpointed, last = STAGES[stage]
    assert straight["checkpointed"] == checkpointed, "the plan's checkpoint steps are the loop's"

    reference, weights = published(folder / "straight" / "out"), published(folder / "chain" / "out")
    assert weights.keys() == reference.keys()
    for key, tensor in reference.items():
        assert weights[key].equal(tensor), f"{stage} after {kills}: {key} differs"
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["history"] == straight["history"], "the published history is the whole history"
    trained = [record["step"] for record in resumed["history"] if stage == "ppo" or "train/loss" in record]
    assert trained == list(range(1, last + 1)), "every step once, those before the restarts included"
    if stage == "ppo":  # the real final figures, not zeros, also after a kill past the last checkpoint
        assert resumed["metrics"]["lambda"] == resumed["history"][-1]["lambda"] == resumed["lambda"] > 1.0
    # What is left are the newest checkpoints, all sealed: `keep` of them, one more when the last
    # kill fell between the final step's seal and its pruning (the next save prunes).
    ckpt = folder / "chain" / "ckpt"
    left = sorted(int(p.name.removeprefix("step-")) for p in ckpt.iterdir())
    keep = plan["ppo"]["actor"]["keep_checkpoints"] if stage == "ppo" else 2
    assert left == checkpointed[-len(left) :] and len(left) <= keep + (
        kills[-1] == f"prune@{checkpointed[-1]}"
    )
    assert all((ckpt / f"step-{step}" / "manifest.json").is_file() for step in left)
