"""Runs real trainers in child processes that SIGKILL themselves at a chosen point (not a test itself).

Launched by test_kill_resume.py: `python kill_worker.py PLAN.json [PLAN.json ...]`. The heavy imports
happen once here; every attempt is a fork of this process, so it starts in well under a second, and
attempts run strictly one after the other. A plan names a stage (sft, reward, cost, guard, ppo), its
inputs and settings, and a list of attempts, each with its own folder (`ckpt/` for checkpoints,
`out/` for the published model, `result.json` with the final metrics, the history and the steps
checkpointed) and an optional kill point:

    step@N     right after the first optimizer step that reaches step N (for PPO: mid-step)
    engine@N   while checkpointing step N, right after the first engine's DeepSpeed save
    write@N    while checkpointing step N, half-way through writing DeepSpeed's first file
    seal@N     engines and state of step N written, the seal not yet
    prune@N    step N sealed, older checkpoints not yet pruned
    publish    training finished, before the final weights are gathered and published

The child kills itself with SIGKILL: no handler, no cleanup, no flush, exactly as a lost pod. The
exit status of every attempt goes to `exits.json` beside the plan.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from mlp_training import KEY

from safe_rlhf_v.config import PPOStageConfig, TrainConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.lineage import validated_dataset_uri
from safe_rlhf_v.train import checkpoint, integrity
from safe_rlhf_v.train.cost import CostObjective
from safe_rlhf_v.train.distributed import Engine
from safe_rlhf_v.train.guard import GuardSettings, train_guard
from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels
from safe_rlhf_v.train.preference import PreferenceSettings, train_preference_model
from safe_rlhf_v.train.reward import RewardObjective
from safe_rlhf_v.train.sft import examples_from_pairs, supervised_finetune


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill: str | None) -> list[int]:
    """Install the kill point in this (child) process; returns the list of steps checkpointed."""
    saved: list[int] = []
    kind, _, at = (kill or "").partition("@")
    target = int(at) if at else None
    saving = {"step": None}

    def at_target() -> bool:
        return saving["step"] == target

    def wrap(owner: Any, name: str, before: bool, condition: Any) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if before and condition(args, kwargs):
                die()
            result = original(*args, **kwargs)
            if not before and condition(args, kwargs, result):
                die()
            return result

        setattr(owner, name, wrapped)

    original_save = checkpoint.Checkpointer.save

    def save(self: checkpoint.Checkpointer, step: int, *args: Any, **kwargs: Any) -> Path:
        saving["step"] = step
        folder = original_save(self, step, *args, **kwargs)
        saving["step"] = None
        saved.append(step)
        return folder

    checkpoint.Checkpointer.save = save  # type: ignore[method-assign]
    if kind == "step":
        wrap(Engine, "backward_and_step", False, lambda a, k, stepped: stepped and a[0].global_step == target)
    elif kind == "engine":
        wrap(Engine, "save_state", False, lambda a, k, result: at_target())
    elif kind == "seal":
        wrap(integrity, "seal", True, lambda a, k: at_target())
    elif kind == "prune":
        wrap(checkpoint, "prune", True, lambda a, k: at_target())
    elif kind == "publish":
        wrap(Engine, "state_dict_for_save", True, lambda a, k: True)
    elif kind == "write":
        real_save = torch.save

        def half_written(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if at_target() and isinstance(f, str | Path):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as handle:
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                die()
            real_save(obj, f, *args, **kwargs)

        torch.save = half_written
    elif kind:
        raise ValueError(f"unknown kill point {kill!r}")
    return saved


def preference_settings(plan: dict[str, Any]) -> PreferenceSettings:
    return PreferenceSettings(
        base_model=plan["model"],
        train=TrainConfig(**plan["train"]),
        max_length=192,
        eval_batch_size=8,
        freeze_vision_tower=True,
        freeze_projector=False,
        min_response_tokens=8,
    )


def splits(plan: dict[str, Any]) -> tuple[Any, Any]:
    uri = validated_dataset_uri(plan["data"])
    train = load_split(uri, "train").select(range(plan["train_rows"]))
    return train, load_split(uri, "evaluation").select(range(plan["eval_rows"]))


def train(plan: dict[str, Any], ckpt: Path, out: Path) -> dict[str, Any]:
    """Run the plan's trainer once; returns its final metrics and its history."""
    stage = plan["stage"]
    if stage == "ppo":
        prompts = load_split(plan["data"], "train").select(range(plan["train_rows"]))
        trainer = PPOLagrangianTrainer(
            PPOStageConfig.model_validate(plan["ppo"]),
            PPOModels(**plan["models"]),
            prompts,
            variant="safe-rlhf-v",
            checkpoint_dir=ckpt,
            checkpoint_key=KEY,
        )
        metrics = trainer.train()
        trainer.save_actor(out)
        return {"metrics": metrics, "history": trainer.history, "lambda": trainer.multiplier.value}
    if stage == "sft":
        rows = load_split(plan["data"], "train").select(range(plan["train_rows"]))
        held_out = load_split(plan["data"], "evaluation").select(range(plan["eval_rows"]))
        result = supervised_finetune(
            plan["model"],
            examples_from_pairs(rows),
            examples_from_pairs(held_out),
            TrainConfig(**plan["train"]),
            out_dir=out,
            checkpoint_dir=ckpt,
            checkpoint_key=KEY,
            max_length=256,
        )
    elif stage == "guard":
        rows, held_out = splits(plan)
        settings = GuardSettings(
            base_model=plan["model"], train=TrainConfig(**plan["train"]), max_length=256, eval_batch_size=8
        )
        result = train_guard(
            settings, train=rows, evaluation=held_out, out_dir=out, checkpoint_dir=ckpt, checkpoint_key=KEY
        )
    else:
        rows, held_out = splits(plan)
        objective = RewardObjective() if stage == "reward" else CostObjective()
        result = train_preference_model(
            objective,
            preference_settings(plan),
            train=rows,
            evaluation=held_out,
            out_dir=out,
            checkpoint_dir=ckpt,
            checkpoint_key=KEY,
        )
    return {"metrics": result.metrics, "history": result.history}


def attempt(plan: dict[str, Any], spec: dict[str, Any]) -> None:
    """One attempt, in a forked child: single-threaded (the same arithmetic in every attempt)."""
    torch.set_num_threads(1)
    folder = Path(spec["dir"])
    saved = arm(spec["kill"])
    outcome = train(plan, folder / "ckpt", folder / "out")
    (folder / "result.json").write_text(json.dumps(outcome | {"checkpointed": saved}), encoding="utf-8")


def main(plans: list[Path]) -> None:
    for plan_path in plans:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
        exits = []
        for spec in plan["attempts"]:
            Path(spec["dir"]).mkdir(parents=True, exist_ok=True)
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    attempt(plan, spec)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            exits.append(os.waitstatus_to_exitcode(status))
            print(f"{plan['stage']}: attempt {spec['dir']} kill={spec['kill']} exit={exits[-1]}", flush=True)
        (plan_path.parent / "exits.json").write_text(json.dumps(exits), encoding="utf-8")


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
