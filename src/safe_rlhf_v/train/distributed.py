"""The one DeepSpeed training engine behind every trainer (reward, cost, guard, PPO actor/critics, SFT).

Same code path everywhere: one CPU process with gloo and fp32 in tests and the demo, `torchrun` with
N processes on CPU, or N GPUs with NCCL and bf16. What changes between them is only what
`init_distributed` discovers and what `train_ds_config` writes into the DeepSpeed config.

Choices, and why:

* The optimizer comes from the DeepSpeed config (AdamW), so ZeRO shards it without
  `zero_allow_untested_optimizer`. Without offload it is `torch.optim.AdamW` (`torch_adam: true`)
  with `fused: true` on every device: torch ships fused AdamW kernels for CPUs as well as GPUs, and
  on a CPU the fused update is 3-4x faster than the per-tensor loop. Nothing is JIT-compiled, so CPU
  runners and GPU images need no build toolchain. With `offload` DeepSpeed's `DeepSpeedCPUAdam` runs
  the update on the CPU; it is JIT-built on first use (needs gcc and ninja in the image).
* A lone process at ZeRO-0 skips DeepSpeed's gradient all-reduce: over a group of one it only
  flattens every gradient into a new buffer and copies it back, which costs time and a full extra
  copy of the gradients. ZeRO-1/2/3 keep it, because that call also moves gradients into their
  partitions.
* The LR schedule is `transformers.get_scheduler` (a `LambdaLR`) handed to `deepspeed.initialize`,
  so DeepSpeed steps it at gradient-accumulation boundaries and stores it in its checkpoints.
* Frozen models (reference, reward, cost during PPO) get `eval_ds_config`: ZeRO-3 stays partitioned,
  ZeRO-1/2 become stage 0 since with no optimizer there is nothing for them to shard
  (align-anything's and TRL's convention).

Checkpoints: `save_state` / `load_state` write and read one engine's DeepSpeed state (weights,
optimizer, LR schedule, global step) inside a step folder; `checkpoint.Checkpointer` makes all
engines of a stage and the loop's state one sealed transaction around them. DeepSpeed's reads go
through `integrity.WeightsOnlyCheckpointEngine` (tensors only, no pickle). Under ZeRO-3 load into a
freshly built Engine, never into the one that just saved (DeepSpeed rule). A checkpoint root must
be visible to every rank (a shared volume when running on several nodes).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import random
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import deepspeed
import numpy as np
import torch
import torch.distributed as tdist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.integrations import HfDeepSpeedConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from safe_rlhf_v.config import ConfigError, TrainConfig
from safe_rlhf_v.train.integrity import WeightsOnlyCheckpointEngine

T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)
Precision = Literal["auto", "fp32", "bf16"]

_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class _MainRankOnly(logging.Filter):
    """Lets records through on rank 0, and warnings and errors on every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _rank() == 0


def get_logger(name: str) -> logging.Logger:
    """A logger whose info/debug records appear once (rank 0), not once per process."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, _MainRankOnly) for f in logger.filters):
        logger.addFilter(_MainRankOnly())
    return logger


logger = get_logger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def find_free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (for a single-process rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank() -> int:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _launched_env() -> tuple[str | None, int, int]:
    """`(init_method, rank, world_size)` for `deepspeed.init_distributed`.

    Under a launcher (torchrun, the Kubeflow Trainer) all five variables must be present;
    guessing a missing one would hang the rendezvous. A lone process rendezvouses with itself
    over a free loopback port passed as `init_method`, and only LOCAL_RANK (which DeepSpeed's
    engine reads) goes into the environment: publishing MASTER_PORT would make any child process
    that also trains try to bind the port this process holds.
    """
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        missing = [key for key in _LAUNCHER_ENV if key not in os.environ]
        if missing:
            raise RuntimeError(
                f"distributed launch is incomplete: {', '.join(missing)} not set (RANK/WORLD_SIZE are); "
                "start the job with torchrun or set all of " + ", ".join(_LAUNCHER_ENV)
            )
        return None, -1, -1
    os.environ.setdefault("LOCAL_RANK", "0")
    return f"tcp://127.0.0.1:{find_free_port()}", 0, 1


def init_distributed() -> DistInfo:
    """Join (or, alone, create) the process group: gloo on CPU, NCCL on GPUs. Idempotent."""
    accelerator = get_accelerator()
    backend = accelerator.communication_backend_name()
    if not tdist.is_initialized():
        init_method, rank, world_size = _launched_env()
        if accelerator.device_name() != "cpu":
            accelerator.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            verbose=False,
        )
        atexit.register(close_distributed)
    else:
        # Registers a process group created elsewhere (plain torch) with deepspeed.comm.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = accelerator.device_name()
    device = torch.device("cpu") if kind == "cpu" else torch.device(kind, local_rank)
    return DistInfo(tdist.get_rank(), local_rank, tdist.get_world_size(), device, backend)


def close_distributed() -> None:
    """Tear the process group down before the interpreter exits (`init_distributed` registers
    this with `atexit` when it creates the group).

    A group left alive keeps gloo's (and DeepSpeed's shared-memory) worker threads running into
    interpreter shutdown. Under torchrun a rank then sometimes aborts after its work is done
    ("terminate called without an active exception", exit -6), and the whole job counts as failed.
    Tearing it down any earlier would break a process that runs several stages (DeepSpeed keeps
    the group it first saw).
    """
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def _bf16_supported(device_type: str) -> bool:
    """Native bf16 support: AVX512-BF16/AMX on CPUs (oneDNN's check), compute capability >= 8 on CUDA."""
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(get_accelerator().is_bf16_supported())


def resolve_precision(precision: Precision, device_type: str) -> Literal["fp32", "bf16"]:
    """auto picks bf16 only on an accelerator that supports it; CPUs train in fp32 unless asked."""
    if precision == "fp32":
        return "fp32"
    if precision == "auto":
        return "bf16" if device_type != "cpu" and _bf16_supported(device_type) else "fp32"
    if not _bf16_supported(device_type):
        raise ConfigError(
            f"precision='bf16' but this {device_type} device has no native bf16 support; "
            "set precision to 'fp32' or 'auto'"
        )
    return "bf16"


def train_ds_config(cfg: TrainConfig, world_size: int, device: str) -> dict[str, Any]:
    """The DeepSpeed config of a trained model on `world_size` processes of `device` ("cpu", "cuda")."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    on_cpu = device == "cpu"
    optimizer_params: dict[str, Any] = {
        "lr": cfg.learning_rate,
        "betas": list(cfg.adam_betas),
        "eps": 1e-8,
        "weight_decay": cfg.weight_decay,
    }
    if cfg.offload == "none":
        optimizer_params |= {"torch_adam": True, "fused": True}
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero |= {"contiguous_gradients": True, "overlap_comm": not on_cpu}
    if cfg.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if cfg.offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    config: dict[str, Any] = {
        "train_batch_size": cfg.per_device_batch_size * world_size * cfg.gradient_accumulation_steps,
        "train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.max_grad_norm,
        "steps_per_print": cfg.log_every_steps,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
    }
    if resolve_precision(cfg.precision, device) == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def eval_ds_config(
    zero_stage: int, precision: Precision, device: str, *, offload_params: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config of a frozen model: ZeRO-3 stays partitioned, stages 1 and 2 become 0."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    stage = 3 if zero_stage == 3 else 0
    if offload_params and stage != 3:
        raise ValueError(
            f"offload_params needs zero_stage=3 (parameters are only partitioned there), got {zero_stage}"
        )
    zero: dict[str, Any] = {"stage": stage}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device != "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
    }
    if resolve_precision(precision, device) == "bf16":
        config["bf16"] = {"enabled": True}
    return config


@contextlib.contextmanager
def _zero3_init(ds_config: dict[str, Any]) -> Iterator[None]:
    # transformers keeps only a weak reference to the HfDeepSpeedConfig: this local keeps it alive
    # while from_pretrained runs. It is unset on exit so that a later non-ZeRO-3 model in the same
    # process is not partitioned; generate() under ZeRO-3 must then pass synced_gpus=True itself.
    init_distributed()  # zero.Init needs the process group; its own fallback would try MPI discovery
    hf_config = HfDeepSpeedConfig(ds_config)
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def model_init_context(ds_config: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
    """Wrap model construction: under ZeRO-3 parameters are partitioned as they are created.

    Both `from_pretrained` (through HfDeepSpeedConfig) and plain `nn.Module` constructors (through
    `deepspeed.zero.Init`) are covered, so a 7B model never materialises whole on one device.
    Other stages need nothing.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        return _zero3_init(ds_config)
    return contextlib.nullcontext()


def build_for_training(cfg: TrainConfig, build: Callable[[], M]) -> M:
    """`build()` for a model that `cfg` will train: under ZeRO-3 partitioned as it is created."""
    dist = init_distributed()
    with model_init_context(train_ds_config(cfg, dist.world_size, dist.device.type)):
        return build()


def _num_elements(param: nn.Parameter) -> int:
    # Under ZeRO-3 a parameter's local tensor is an empty partition; ds_numel is its full size.
    return int(getattr(param, "ds_numel", param.numel()))


class Engine:
    """Owns a DeepSpeed engine: backward, step, LR schedule, checkpoints, rank-aware helpers.

    Build the model under `model_init_context(train_ds_config(...))` when `zero_stage` is 3.
    Only parameters with `requires_grad` are optimised (freeze a vision tower before this).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, total_steps: int, name: str = "model") -> None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(
                f"{name}: no parameter has requires_grad=True, so there is nothing to train; "
                "unfreeze at least the part this stage trains (e.g. the score head)"
            )
        if total_steps < 1:
            raise ValueError(f"{name}: total_steps must be >= 1, got {total_steps}")
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(model, name)
        self.name = name
        self.cfg = cfg
        self.dist = init_distributed()
        self.ds_config = train_ds_config(cfg, self.dist.world_size, self.dist.device.type)
        self.total_steps = total_steps
        self.warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

        def scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            return get_scheduler(
                cfg.lr_scheduler,
                optimizer,
                num_warmup_steps=self.warmup_steps,
                num_training_steps=total_steps,
            )

        self.ds: deepspeed.DeepSpeedEngine = deepspeed.initialize(
            model=model, model_parameters=trainable, config=self.ds_config, lr_scheduler=scheduler
        )[0]
        if self.dist.world_size == 1 and cfg.zero_stage == 0:
            self.ds.enable_backward_allreduce = False  # an all-reduce over one process is an identity
        if type(self.ds.checkpoint_engine) is not TorchCheckpointEngine:
            raise RuntimeError(
                f"{name}: unexpected DeepSpeed checkpoint engine {type(self.ds.checkpoint_engine)}"
            )
        self.ds.checkpoint_engine = WeightsOnlyCheckpointEngine(self.ds._config)
        logger.info(
            "%s: %d trainable of %d parameters, ZeRO-%d, %s, %d process(es) on %s, %d steps (%d warmup)",
            name,
            sum(_num_elements(p) for p in trainable),
            sum(_num_elements(p) for p in model.parameters()),
            cfg.zero_stage,
            "bf16" if self.ds_config.get("bf16") else "fp32",
            self.dist.world_size,
            self.dist.device,
            total_steps,
            self.warmup_steps,
        )

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (partitioned under ZeRO-3: use `state_dict_for_save` to export it)."""
        return self.ds.module

    @property
    def dtype(self) -> torch.dtype:
        """What floating inputs (pixel values) must be cast to before the forward pass."""
        return torch.bfloat16 if self.ds_config.get("bf16") else torch.float32

    @property
    def global_step(self) -> int:
        """Optimizer steps taken, restored by `load_state`."""
        return int(self.ds.global_steps)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ds(*args, **kwargs)

    forward = __call__

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        """Backward, then DeepSpeed's step (it only updates at accumulation boundaries).

        Returns True when an optimizer step (and LR-schedule step) happened.
        """
        boundary = bool(self.ds.is_gradient_accumulation_boundary())
        self.ds.backward(loss)
        self.ds.step()
        return boundary

    @property
    def at_step_boundary(self) -> bool:
        """No gradients are pending: the last micro-batch completed an accumulation window.

        DeepSpeed checkpoints hold no partial gradients, so only here can a checkpoint be resumed exactly.
        """
        return self.ds.micro_steps % self.ds.gradient_accumulation_steps() == 0

    def save_state(self, folder: Path, tag: str) -> None:
        """DeepSpeed's checkpoint of this engine into `folder/tag`; every rank calls it at a step boundary."""
        self.ds.save_checkpoint(str(folder), tag=tag, client_state={}, save_latest=False)

    def load_state(self, folder: Path, tag: str) -> None:
        """Weights, optimizer, LR schedule and global step from `folder/tag` (verified by the caller)."""
        load_path, _ = self.ds.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"{self.name}: DeepSpeed could not load the checkpoint in {folder / tag}")
        logger.info("%s: resumed from %s (step %d)", self.name, folder / tag, self.global_step)

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 for `save_pretrained(..., state_dict=...)`; {} on other ranks.

        Every rank must call it: under ZeRO-3 the partitions are gathered layer by layer onto
        rank 0 (DeepSpeed's consolidation, also used by accelerate). Otherwise the tensors are the
        live CPU parameters themselves, so save them before training on.
        """
        if self.ds.zero_optimization_partition_weights():
            gathered = self.ds._zero3_consolidated_16bit_state_dict()
            return dict(gathered) if self.is_main else {}
        if not self.is_main:
            return {}
        return {key: value.detach().cpu() for key, value in self.module.state_dict().items()}


def _enable_gradient_checkpointing(model: nn.Module, name: str) -> None:
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ConfigError(
            f"{name}: gradient_checkpointing=true but {type(model).__name__} has no "
            "gradient_checkpointing_enable(); set gradient_checkpointing to false"
        )
    # Non-reentrant checkpointing also works when the inputs (frozen embeddings) need no grad.
    enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def frozen_engine(
    model: nn.Module, *, zero_stage: int, precision: Precision = "auto", offload_params: bool = False
) -> deepspeed.DeepSpeedEngine:
    """Wrap a model that is only evaluated (reference policy, reward and cost models during PPO)."""
    dist = init_distributed()
    model.requires_grad_(False)
    config = eval_ds_config(zero_stage, precision, dist.device.type, offload_params=offload_params)
    engine = deepspeed.initialize(model=model, config=config)[0]
    engine.eval()
    return engine


def _comm_device() -> torch.device:
    # NCCL only moves accelerator tensors; gloo takes CPU ones.
    return torch.device(get_accelerator().current_device_name())


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """The mean of a scalar over all ranks (the scalar itself when not distributed)."""
    tensor = torch.as_tensor(value).detach()
    if tensor.numel() != 1:
        raise ValueError(f"all_reduce_mean takes a scalar, got a tensor of shape {tuple(tensor.shape)}")
    if not (tdist.is_available() and tdist.is_initialized()):
        return float(tensor)
    tensor = tensor.reshape(1).to(device=_comm_device(), dtype=torch.float64)
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return float(tensor) / tdist.get_world_size()


def broadcast_int(value: int) -> int:
    """Rank 0's `value` on every rank (the value itself when not distributed)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_comm_device())
    tdist.broadcast(tensor, src=0)
    return int(tensor.item())


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def is_main_process() -> bool:
    return _rank() == 0


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch (all CUDA devices); ranks differ so their dropout masks differ."""
    value = seed + rank
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterable[T]:
    """A progress bar on rank 0 only; other ranks iterate silently.

    Redirected to a log (a KFP pod, `make demo` piped through kfp.local) every refresh becomes a line
    of its own, so off a terminal the bar refreshes every 15 s instead of 10 times a second.
    """
    if is_main_process():
        interval = 0.1 if sys.stderr.isatty() else 15.0
        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=interval)
    return iterable
