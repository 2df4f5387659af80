"""Reward-model (RM-V) training throughput and memory, on the demo model or any model and data.

Each step is the train-reward stage's own step, single process: rows from a `datasets.Dataset`
(images decoded), `PreferenceCollator`, the DeepSpeed `Engine` around a `ScoreModel` built by the
stage's loader, `RewardObjective`'s loss, `backward_and_step`. Stage defaults (max_length, freezing,
regularisation, optimizer) come from `RewardStageConfig`, so a default run measures what the
stage runs. The first `--warmup` steps are excluded (allocator growth, lazy init, CUDA kernels'
first launch). Without `--model` it builds a random-weight LLaVA of `--shape` (the demo's sizes,
or the `7b-like` and `1b` shapes the GPU check runs), so nothing is downloaded.

Figures printed (and with `--json` also as one JSON line, the last line of output):

* pairs/s, and tokens/s both real (attention-mask ones) and padded (batch x length); the padding
  share is the part of the padded tokens that is padding;
* the share of step time spent fetching and collating rows (processor, image transforms);
* peak memory: the process's peak RSS on CPU (`ru_maxrss`, so model build and data count too),
  `torch.cuda.max_memory_allocated` over the measured steps on CUDA;
* model FLOP/s, estimated as (6 x N_trained + 2 x N_frozen) x padded tokens / second, where N counts
  the parameters of matrix multiplications (embedding tables are lookups and are left out) and
  attention's sequence-length term is ignored; on CUDA, MFU = that / the GPU's peak FLOP/s.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reward_throughput.py --help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# isort: split
import safe_rlhf_v  # noqa: F401  (before torch: its OMP_WAIT_POLICY default must precede OpenMP's load)

# isort: split
import datasets
import torch
from torch import nn
from transformers import AutoProcessor

from safe_rlhf_v.config import RewardStageConfig, TrainConfig
from safe_rlhf_v.data.collate import PreferenceCollator
from safe_rlhf_v.data.schema import detect_layout
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.data.synthetic import corpus, generate_records, to_dataset
from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm

if TYPE_CHECKING:  # the train package imports deepspeed, which must wait for select_device
    from safe_rlhf_v.train.distributed import Engine
    from safe_rlhf_v.train.reward import RewardObjective

DEMO_TOKENIZER_ROWS = 600  # what `safe-rlhf-v make-demo-model` trains the demo tokenizer on
# Named model sizes for runs on a GPU; the random-weight model is built from the spec, never
# downloaded. A spec flag (`--text-layers`, ...) overrides one field of the chosen shape.
SHAPES = {
    "demo": TinyVLMSpec(),
    # LLaVA-1.5-7B's matrix shapes: a CLIP ViT-L/14 tower at 336 px (576 image tokens) and Llama-7B's
    # decoder layer (4096 wide, 32 heads, FFN 11008). Only 8 of its 32 decoder layers, so that
    # building, saving and loading the random weights fits the GPU check's budget: per-layer shapes,
    # hence MFU, are 7B's; memory grows with `--text-layers 32` by about the extra layers' share.
    "7b-like": TinyVLMSpec(
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=24,
        vision_heads=16,
        vision_ffn=4096,
        text_hidden=4096,
        text_layers=8,
        text_heads=32,
        text_ffn=11008,
        vocab_size=32000,
        max_positions=4096,
    ),
    # A TinyLlama-sized decoder (2048 wide, 24 layers, FFN 5632) on a CLIP ViT-B/16 tower at 224 px
    # (196 image tokens): about 1.3 B actor parameters, so all six PPO roles fit one GPU.
    "1b": TinyVLMSpec(
        image_size=224,
        patch_size=16,
        vision_hidden=768,
        vision_layers=12,
        vision_heads=12,
        vision_ffn=3072,
        text_hidden=2048,
        text_layers=24,
        text_heads=16,
        text_ffn=5632,
        vocab_size=32000,
        max_positions=2048,
    ),
}
# bf16 dense tensor-core peaks (TFLOP/s) from NVIDIA's data sheets; first substring match wins.
PEAK_TFLOPS_BY_NAME = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclasses.dataclass(frozen=True)
class StepStats:
    """One measured step: wall time, the part of it spent on data, and its token counts."""

    seconds: float
    data_seconds: float
    real_tokens: int
    padded_tokens: int


@dataclasses.dataclass(frozen=True)
class Report:
    """Everything the benchmark prints, JSON-serialisable."""

    device: str
    device_name: str
    torch_threads: int
    model: str
    shape: str
    trained_params: int
    frozen_params: int
    pairs_per_step: int
    steps: int
    warmup: int
    zero_stage: int
    precision: str
    gradient_checkpointing: bool
    max_length: int
    seconds: float
    pairs_per_s: float
    real_tokens_per_s: float
    padded_tokens_per_s: float
    padding_share: float
    mean_sequence_length: float
    data_share: float
    peak_memory_mib: float
    peak_memory_kind: str
    model_tflops_per_s: float
    peak_tflops: float | None
    peak_tflops_source: str
    mfu: float | None


def _spec_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(TinyVLMSpec))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options; every `TinyVLMSpec` size becomes a flag (`--text-hidden`, ...) for the built model."""
    stage = RewardStageConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", type=Path, help="base model folder (default: build one of --shape)")
    parser.add_argument("--data", help="data folder or URI with a train split (default: synthetic rows)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run before measuring (default 3)")
    parser.add_argument(
        "--batch-size", type=int, default=stage.train.per_device_batch_size, help="pairs/step"
    )
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=stage.train.zero_stage)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=stage.train.precision)
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=stage.train.gradient_checkpointing,
        help="recompute activations in backward (TrainConfig.gradient_checkpointing); model FLOP/s "
        "and MFU still count each weight's work once, not the recomputation",
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default="demo",
        help="named sizes of the built model (spec flags override single fields; only without --model)",
    )
    parser.add_argument("--max-length", type=int, default=stage.max_length)
    parser.add_argument("--peak-tflops", type=float, help="GPU peak TFLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    spec = parser.add_argument_group("built model sizes (TinyVLMSpec, over --shape; only without --model)")
    for field in _spec_fields():
        flag = "--" + field.name.replace("_", "-")
        spec.add_argument(
            flag, type=int, dest=f"spec_{field.name}", metavar="N", help=f"default {field.default}"
        )
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.model is not None and (_spec_overrides(args) or args.shape != "demo"):
        flags = ", ".join("--" + name.replace("_", "-") for name in [*_spec_overrides(args), "shape"])
        parser.error(f"{flags} size the built model and cannot apply to --model")
    return args


def _spec_overrides(args: argparse.Namespace) -> dict[str, int]:
    values = {field.name: getattr(args, f"spec_{field.name}") for field in _spec_fields()}
    return {name: value for name, value in values.items() if value is not None}


def shape_spec(shape: str, overrides: dict[str, int]) -> TinyVLMSpec:
    """The named shape's sizes with the fields the spec flags set replaced."""
    return dataclasses.replace(SHAPES[shape], **overrides)


def select_device(device: str) -> None:
    """Pin DeepSpeed's accelerator before it is first imported; CUDA must exist when asked for."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: no CUDA device is available to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run with --device cpu"
        )
    if "deepspeed" in sys.modules:
        raise RuntimeError("deepspeed was imported before the benchmark chose its accelerator")
    os.environ["DS_ACCELERATOR"] = device


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(trained, frozen) parameter counts of everything but embedding tables.

    Full sizes under ZeRO-3 too, where a parameter's local tensor is an empty partition.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    trained = frozen = 0
    for param in model.parameters():
        if id(param) in embeddings:
            continue
        count = int(getattr(param, "ds_numel", param.numel()))
        if param.requires_grad:
            trained += count
        else:
            frozen += count
    return trained, frozen


def peak_tflops(override: float | None, device_name: str) -> tuple[float | None, str]:
    """The GPU's peak TFLOP/s and where that figure comes from (printed beside the MFU)."""
    if override is not None:
        return override, "--peak-tflops"
    for key, tflops in PEAK_TFLOPS_BY_NAME:
        if key in device_name:
            return tflops, f"{key} bf16 dense data-sheet peak (assumed; set --peak-tflops to change)"
    return None, f"unknown GPU {device_name!r}: pass --peak-tflops for an MFU"


def peak_rss_mib() -> float:
    """Peak resident set size of this process; ru_maxrss is in KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def load_rows(args: argparse.Namespace) -> datasets.Dataset:
    """The benchmark's training rows: the `--data` train split, or fresh synthetic pairs."""
    if args.data:
        train = load_split(args.data, "train")
        if detect_layout(train.column_names) != "paired":
            raise SystemExit(
                f"--data {args.data}: the train split is in the flattened layout; reward "
                "training needs preference pairs (response_1, response_2, ...)"
            )
        return train
    rows = max(DEMO_TOKENIZER_ROWS, args.batch_size * (args.warmup + args.steps))
    return to_dataset(generate_records(rows, seed=args.seed, split="train"))


def build_model(out_dir: Path, train: datasets.Dataset, args: argparse.Namespace) -> Path:
    """A random-weight LLaVA of `--shape` (random, so nothing is downloaded), its tokenizer trained on
    the rows' texts as `make-demo-model` does."""
    texts = train.select_columns(["question", "response_1", "response_2"])
    spec = shape_spec(args.shape, _spec_overrides(args))
    return build_tiny_vlm(out_dir, corpus(list(texts)), spec=spec, seed=args.seed)


def batches(rows: int, batch_size: int, count: int, seed: int) -> list[list[int]]:
    """`count` batches of row indices from a seeded shuffle, wrapping around a small data set."""
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return [[order[(b * batch_size + j) % rows] for j in range(batch_size)] for b in range(count)]


def run(args: argparse.Namespace, model_dir: Path, train: datasets.Dataset) -> Report:
    """Build the stage's engine on `model_dir`, train `warmup + steps` steps, measure the last `steps`."""
    # Imported here: deepspeed picks its accelerator on import, after select_device.
    from safe_rlhf_v.train.distributed import Engine, build_for_training, init_distributed, seed_everything
    from safe_rlhf_v.train.preference import PreferenceSettings, load_score_model
    from safe_rlhf_v.train.reward import RewardObjective

    stage = RewardStageConfig()
    total = args.warmup + args.steps
    cfg = TrainConfig(
        per_device_batch_size=args.batch_size,
        zero_stage=args.zero_stage,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        max_steps=total,
        seed=args.seed,
    )
    dist = init_distributed()
    if dist.world_size != 1 or dist.device.type != args.device:
        raise SystemExit(
            f"expected one process on {args.device}, got {dist.world_size} on {dist.device}: "
            "run the benchmark as a single plain python process"
        )
    seed_everything(cfg.seed, dist.rank)
    settings = PreferenceSettings(
        base_model=str(model_dir),
        train=cfg,
        max_length=args.max_length,
        eval_batch_size=stage.eval_batch_size,
        freeze_vision_tower=stage.freeze_vision_tower,
        freeze_projector=stage.freeze_projector,
        min_response_tokens=stage.min_response_tokens,
    )
    objective = RewardObjective(regularization=stage.regularization)
    collator = PreferenceCollator(
        AutoProcessor.from_pretrained(model_dir),
        args.max_length,
        min_response_tokens=stage.min_response_tokens,
    )
    model = build_for_training(cfg, lambda: load_score_model(objective, settings))
    trained, frozen = matmul_params(model)
    engine = Engine(model, cfg, total_steps=total, name="reward-benchmark")
    cuda = dist.device.type == "cuda"
    measured: list[StepStats] = []
    for step, indices in enumerate(batches(len(train), args.batch_size, total, args.seed)):
        if cuda and step == args.warmup:
            torch.cuda.reset_peak_memory_stats()
        stats = _train_step(engine, collator, objective, train, indices)
        if step >= args.warmup:
            measured.append(stats)
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    precision = "bf16" if engine.dtype == torch.bfloat16 else "fp32"
    return _report(args, precision, measured, (trained, frozen), name)


def _train_step(
    engine: Engine,
    collator: PreferenceCollator,
    objective: RewardObjective,
    train: datasets.Dataset,
    indices: list[int],
) -> StepStats:
    """The stage's training step, timed from fetching the rows (image decoding included) to the
    optimizer update; on CUDA it waits for the GPU before stopping the clock."""
    from safe_rlhf_v.train.batches import on_device

    start = time.perf_counter()
    batch = collator([train[i] for i in indices])
    data_done = time.perf_counter()
    out = engine(**on_device(batch.inputs, engine))
    half = len(indices)
    loss = objective.loss(out.end_scores[:half].float(), out.end_scores[half:].float(), batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"reward loss is {loss.item()} at step {engine.global_step}")
    engine.backward_and_step(loss)
    if engine.dist.device.type == "cuda":
        torch.cuda.synchronize()
    mask = batch.inputs["attention_mask"]
    return StepStats(
        seconds=time.perf_counter() - start,
        data_seconds=data_done - start,
        real_tokens=int(mask.sum()),
        padded_tokens=mask.numel(),
    )


def _built_model_name(args: argparse.Namespace) -> str:
    sizes = ", ".join(f"{name}={value}" for name, value in _spec_overrides(args).items())
    return f"random-weight LLaVA, shape {args.shape}" + (f" with {sizes}" if sizes else "")


def _report(
    args: argparse.Namespace,
    precision: str,
    measured: list[StepStats],
    params: tuple[int, int],
    device_name: str,
) -> Report:
    """Totals over the measured steps; `params` is (trained, frozen) from `matmul_params`."""
    trained, frozen = params
    seconds = sum(s.seconds for s in measured)
    real = sum(s.real_tokens for s in measured)
    padded = sum(s.padded_tokens for s in measured)
    model_flops = (6 * trained + 2 * frozen) * padded / seconds
    cuda = args.device == "cuda"
    peak, source = (
        peak_tflops(args.peak_tflops, device_name) if cuda else (None, "MFU is measured on CUDA only")
    )
    return Report(
        device=args.device,
        device_name=device_name,
        torch_threads=torch.get_num_threads(),
        model=str(args.model) if args.model else _built_model_name(args),
        shape="--model" if args.model else args.shape,
        trained_params=trained,
        frozen_params=frozen,
        pairs_per_step=args.batch_size,
        steps=len(measured),
        warmup=args.warmup,
        zero_stage=args.zero_stage,
        precision=precision,
        gradient_checkpointing=args.gradient_checkpointing,
        max_length=args.max_length,
        seconds=seconds,
        pairs_per_s=args.batch_size * len(measured) / seconds,
        real_tokens_per_s=real / seconds,
        padded_tokens_per_s=padded / seconds,
        padding_share=1 - real / padded,
        mean_sequence_length=real / (2 * args.batch_size * len(measured)),
        data_share=sum(s.data_seconds for s in measured) / seconds,
        peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib(),
        peak_memory_kind="torch.cuda.max_memory_allocated" if cuda else "process peak RSS (ru_maxrss)",
        model_tflops_per_s=model_flops / 1e12,
        peak_tflops=peak,
        peak_tflops_source=source,
        mfu=model_flops / (peak * 1e12) if peak else None,
    )


def format_report(r: Report) -> str:
    """The human-readable figures, one per line."""
    mfu = f"n/a ({r.peak_tflops_source})"
    if r.mfu is not None:
        mfu = f"{r.mfu:.2%} of {r.peak_tflops:g} TFLOP/s ({r.peak_tflops_source})"
    return "\n".join(
        [
            f"device        {r.device} ({r.device_name}), torch threads {r.torch_threads}",
            f"model         {r.model}",
            f"parameters    {r.trained_params:,} trained + {r.frozen_params:,} frozen (embeddings excluded)",
            f"setup         {r.pairs_per_step} pairs/step, ZeRO-{r.zero_stage}, {r.precision}, "
            f"gradient checkpointing {'on' if r.gradient_checkpointing else 'off'}, "
            f"max_length {r.max_length}, {r.steps} steps measured after {r.warmup} warmup",
            f"pairs/s       {r.pairs_per_s:.2f}  ({r.seconds:.2f} s measured)",
            f"tokens/s      real {r.real_tokens_per_s:,.0f}, padded {r.padded_tokens_per_s:,.0f} "
            f"(padding {r.padding_share:.1%}; mean sequence {r.mean_sequence_length:.1f} real tokens)",
            f"data+collate  {r.data_share:.1%} of step time",
            f"peak memory   {r.peak_memory_mib:,.0f} MiB ({r.peak_memory_kind})",
            f"model FLOP/s  {r.model_tflops_per_s:.3g} TFLOP/s = "
            "(6 x trained + 2 x frozen params) x padded tokens / s",
            f"MFU           {mfu}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    select_device(args.device)
    with tempfile.TemporaryDirectory(prefix="reward-throughput-") as tmp:
        train = load_rows(args)
        model_dir = args.model or build_model(Path(tmp) / "model", train, args)
        report = run(args, model_dir, train)
    print(format_report(report))
    if args.json:
        print(json.dumps(dataclasses.asdict(report), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
