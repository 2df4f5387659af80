"""The DeepSpeed engine on CPU: configs, LR schedule, training under ZeRO-2/3, bf16, torchrun.

Training tests run in this process on a one-rank gloo group that lives for the whole session
(DeepSpeed engines cannot re-initialise torch.distributed); the two-rank case runs under torchrun
in a subprocess. Checkpoints: test_checkpoint.py; the training loop: test_loop.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from mlp_training import BATCH, KEY, config, max_diff, mlp, params, regression, run_steps
from pydantic import ValidationError
from safetensors.torch import load_file
from torch import nn
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.train import distributed
from safe_rlhf_v.train.checkpoint import Checkpointer, rng_file
from safe_rlhf_v.train.distributed import (
    DistInfo,
    Engine,
    all_reduce_mean,
    eval_ds_config,
    find_free_port,
    frozen_engine,
    get_logger,
    init_distributed,
    model_init_context,
    progress,
    seed_everything,
    train_ds_config,
)
from safe_rlhf_v.train.integrity import MANIFEST

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

WORKER = Path(__file__).with_name("ddp_mlp_worker.py")


@pytest.fixture(scope="module")
def dist() -> DistInfo:
    return init_distributed()


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return regression()


# --- configuration -----------------------------------------------------------------------------


def test_train_ds_config_from_train_config() -> None:
    cfg = TrainConfig(
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.5,
        zero_stage=2,
        learning_rate=1e-3,
        weight_decay=0.1,
        adam_betas=[0.8, 0.9],
    )
    ds = train_ds_config(cfg, world_size=3, device="cpu")
    assert ds["train_batch_size"] == 24
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert "bf16" not in ds  # precision "auto" trains a CPU in fp32
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {
            "lr": 1e-3,
            "betas": [0.8, 0.9],
            "eps": 1e-8,
            "weight_decay": 0.1,
            "torch_adam": True,
            "fused": True,  # torch's fused AdamW runs on CPUs too
        },
    }


def test_gpu_config_uses_bf16_fused_adam_and_cpu_adam_with_offload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "_bf16_supported", lambda device: device == "cuda")
    ds = train_ds_config(TrainConfig(zero_stage=3), world_size=8, device="cuda")
    assert ds["bf16"] == {"enabled": True}
    assert ds["train_batch_size"] == 32
    assert ds["optimizer"]["params"]["fused"] is True
    offloaded = train_ds_config(TrainConfig(zero_stage=3, offload="all"), world_size=8, device="cuda")
    assert "torch_adam" not in offloaded["optimizer"]["params"]  # DeepSpeedCPUAdam does the update
    assert offloaded["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert offloaded["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_bf16_without_hardware_support_says_what_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed, "_bf16_supported", lambda device: False)
    with pytest.raises(
        ValueError, match=r"precision='bf16'.*no native bf16 support.*set precision to 'fp32'"
    ):
        train_ds_config(TrainConfig(precision="bf16"), world_size=1, device="cpu")
    assert "bf16" not in train_ds_config(TrainConfig(precision="auto"), world_size=1, device="cuda")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"adam_betas": [0.9, 0.95, 0.99]}, "adam_betas"),
        ({"adam_betas": [0.9, 1.0]}, r"adam_betas must both lie in \[0, 1\)"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"offload": "optimizer"}, "offload='optimizer' needs ZeRO: set zero_stage"),
        ({"offload": "all", "zero_stage": 2}, "only ZeRO-3 partitions"),
        ({"lr": 1e-4}, "lr"),
        ({"epochs": "3"}, "epochs"),
    ],
)
def test_train_config_rejects_bad_settings(fields: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        TrainConfig(**fields)


def test_eval_config_keeps_zero3_and_drops_zero1_and_zero2() -> None:
    stages = [eval_ds_config(s, "fp32", "cpu")["zero_optimization"]["stage"] for s in (0, 1, 2, 3)]
    assert stages == [0, 0, 0, 3]
    assert eval_ds_config(3, "fp32", "cpu", offload_params=True)["zero_optimization"]["offload_param"] == {
        "device": "cpu",
        "pin_memory": False,
    }
    with pytest.raises(ValueError, match="offload_params needs zero_stage=3"):
        eval_ds_config(2, "fp32", "cpu", offload_params=True)


# --- process group and rank-aware helpers -----------------------------------------------------


def test_init_distributed_single_process_is_idempotent(dist: DistInfo) -> None:
    assert dist == DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    assert init_distributed() == dist
    assert torch.distributed.get_world_size() == 1


def test_incomplete_launcher_env_names_missing_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed._launched_env()


def test_rank_aware_helpers(
    dist: DistInfo, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert all_reduce_mean(torch.tensor(2.5)) == 2.5
    with pytest.raises(ValueError, match=r"scalar, got a tensor of shape \(2,\)"):
        all_reduce_mean(torch.ones(2))
    items = [1, 2, 3]
    assert progress(items, total=3, desc="x") is not items and list(progress(items, total=3)) == items
    log = get_logger("safe_rlhf_v.test_rank_filter")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("shown on rank 0")
        monkeypatch.setattr(distributed, "_rank", lambda: 1)
        assert progress(items, total=3) is items
        log.info("hidden on rank 1")
        log.warning("warnings show on every rank")
    assert [r.getMessage() for r in caplog.records] == ["shown on rank 0", "warnings show on every rank"]


def test_seed_everything_is_reproducible_and_differs_by_rank() -> None:
    seed_everything(5, rank=0)
    first = torch.rand(3)
    seed_everything(5, rank=0)
    assert torch.equal(torch.rand(3), first)
    seed_everything(5, rank=1)
    assert not torch.equal(torch.rand(3), first)


# --- engine ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # 10 steps, warmup ceil(0.15 * 10) = 2; cosine at step 4: 0.5 * (1 + cos(pi * 2/8)).
        ("cosine", {0: 0.0, 1: 0.05, 2: 0.1, 4: 0.1 * 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.05, 10: 0.0}),
        ("linear", {0: 0.0, 1: 0.05, 2: 0.1, 4: 0.075, 6: 0.05, 10: 0.0}),
        ("constant_with_warmup", {0: 0.0, 1: 0.05, 2: 0.1, 4: 0.1, 6: 0.1, 10: 0.1}),
    ],
)
def test_lr_schedule_warms_up_then_decays(
    dist: DistInfo, data: tuple[torch.Tensor, torch.Tensor], schedule: str, expected: dict[int, float]
) -> None:
    engine = Engine(
        mlp(), config(lr_scheduler=schedule, warmup_ratio=0.15, learning_rate=0.1), total_steps=10
    )
    assert engine.warmup_steps == 2
    seen = {0: engine.lr}
    for step in range(10):
        run_steps(engine, data, range(step, step + 1))
        seen[engine.global_step] = engine.lr
    assert {k: seen[k] for k in expected} == pytest.approx(expected, abs=1e-9)


def test_one_process_at_zero0_skips_the_all_reduce_and_trains_like_plain_torch(
    dist: DistInfo, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Alone at ZeRO-0, DeepSpeed's all-reduce would only copy the gradients: without it the engine
    takes exactly the steps of fused AdamW with global-norm clipping in plain PyTorch."""
    cfg = config(max_grad_norm=0.05, weight_decay=0.01)  # a small norm, so clipping really acts
    seed_everything(0, dist.rank)
    model = mlp()
    plain = mlp()
    plain.load_state_dict(model.state_dict())
    engine = Engine(model, cfg, total_steps=5)
    assert engine.ds.enable_backward_allreduce is False
    assert engine.ds.optimizer.param_groups[0]["fused"] is True
    optimizer = torch.optim.AdamW(
        plain.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=True
    )
    x, y = data
    for step in range(5):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        engine.backward_and_step(nn.functional.mse_loss(engine(x[rows]), y[rows]))
        nn.functional.mse_loss(plain(x[rows]), y[rows]).backward()
        assert float(nn.utils.clip_grad_norm_(plain.parameters(), cfg.max_grad_norm)) > cfg.max_grad_norm
        optimizer.step()
        optimizer.zero_grad()
    assert max_diff(params(engine.module), params(plain)) < 1e-6
    # ZeRO-2 moves gradients into its partitions inside that same call, so it keeps it.
    assert Engine(mlp(), config(zero_stage=2), total_steps=1).ds.enable_backward_allreduce is True


def test_zero2_trains_only_unfrozen_parameters(
    dist: DistInfo, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    seed_everything(0, dist.rank)
    model = mlp()
    model[0].requires_grad_(False)  # stands in for a frozen vision tower
    before = params(model)
    engine = Engine(model, config(zero_stage=2), total_steps=40)
    losses = run_steps(engine, data, range(40))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    after = params(engine.module)
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert not torch.equal(after["3.weight"], before["3.weight"])
    assert engine.global_step == 40


def test_zero3_partitions_at_construction_trains_and_gathers_weights(
    dist: DistInfo, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    cfg = config(zero_stage=3)
    seed_everything(0, dist.rank)
    with model_init_context(train_ds_config(cfg, dist.world_size, dist.device.type)):
        assert is_deepspeed_zero3_enabled()  # from_pretrained inside would partition too
        model = mlp()
    assert not is_deepspeed_zero3_enabled()  # a later stage-0 model in this process is left whole
    assert all(p.numel() == 0 for p in model.parameters())  # only ZeRO partitions hold the values
    engine = Engine(model, cfg, total_steps=40)
    losses = run_steps(engine, data, range(40))
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    exported = engine.state_dict_for_save()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {
        k: tuple(v.shape) for k, v in mlp().state_dict().items()
    }
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        assert max_diff(exported, params(engine.module)) == 0.0


def test_frozen_engine_evaluates_like_the_plain_model(
    dist: DistInfo, data: tuple[torch.Tensor, torch.Tensor]
) -> None:
    model = mlp()
    expected = model(data[0]).detach()
    frozen = frozen_engine(model, zero_stage=2, precision="fp32")
    assert frozen.zero_optimization_stage() == 0
    assert not any(p.requires_grad for p in frozen.module.parameters())
    with torch.no_grad():
        assert torch.allclose(frozen(data[0]), expected)


def test_engine_rejects_models_it_cannot_train(dist: DistInfo) -> None:
    with pytest.raises(ValueError, match=r"reward: no parameter has requires_grad=True"):
        Engine(mlp().requires_grad_(False), config(), total_steps=1, name="reward")
    with pytest.raises(ValueError, match="Sequential has no gradient_checkpointing_enable"):
        Engine(mlp(), config(gradient_checkpointing=True), total_steps=1)


def test_gradient_accumulation_boundaries(dist: DistInfo, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    engine = Engine(mlp(), config(gradient_accumulation_steps=2), total_steps=2)
    x, y = data
    assert engine.backward_and_step(nn.functional.mse_loss(engine(x[:BATCH]), y[:BATCH])) is False
    assert engine.global_step == 0 and not engine.at_step_boundary
    assert engine.backward_and_step(nn.functional.mse_loss(engine(x[BATCH:16]), y[BATCH:16])) is True
    assert engine.global_step == 1 and engine.at_step_boundary


@pytest.mark.skipif(not distributed._bf16_supported("cpu"), reason="this CPU has no native bf16")
@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_trains_and_resumes_like_on_a_gpu(
    dist: DistInfo, data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path, stage: int
) -> None:
    # The GPU configuration (bf16 weights, fp32 master copy in the optimizer) run on a bf16-capable CPU.
    cfg = config(zero_stage=stage, precision="bf16")
    engine = Engine(mlp(), cfg, total_steps=30)
    assert engine.dtype == torch.bfloat16 and next(engine.module.parameters()).dtype == torch.bfloat16
    x, y = data
    losses = []
    for step in range(30):
        start = (step * BATCH) % len(x)
        out = engine(x[start : start + BATCH].to(engine.dtype))
        loss = nn.functional.mse_loss(out.float(), y[start : start + BATCH])
        losses.append(loss.item())
        engine.backward_and_step(loss)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    Checkpointer(tmp_path, key=KEY, fingerprint={}, keep=1).save(30, {"mlp": engine}, {})
    resumed = Engine(mlp(), cfg, total_steps=30)
    assert Checkpointer(tmp_path, key=KEY, fingerprint={}, keep=1).restore({"mlp": resumed}) == {"step": 30}
    assert max_diff(params(resumed.module), params(engine.module)) == 0.0


@pytest.mark.parametrize("stage", [0, 2])  # ZeRO-0 all-reduces in the engine, ZeRO-2 in its optimizer
def test_torchrun_two_ranks_train_in_sync_and_resume(tmp_path: Path, stage: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    rendezvous = f"--master_addr 127.0.0.1 --master_port {find_free_port()}"
    launcher = f"-m torch.distributed.run --nproc_per_node 2 {rendezvous}"
    command = [sys.executable, *launcher.split(), str(WORKER), str(tmp_path), str(stage)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    losses = reports[0]["losses"]
    assert reports[1]["losses"] == losses  # all_reduce_mean: one global loss per step on both ranks
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert max_diff(rank0, rank1) == 0.0  # DeepSpeed broadcast rank 0's weights and averaged gradients
    manifest = json.loads((tmp_path / "ckpt" / "step-30" / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and {rng_file(0), rng_file(1)} <= set(manifest["files"])
    for report in reports:
        assert report["state"] == {"step": 30, "position": {"epoch": 1, "batches_done": 0}}
        assert report["resumed_step"] == 30
        assert report["resume_max_abs_diff"] == 0.0
