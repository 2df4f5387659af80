"""PPO-Lagrangian step time and memory, split into generation, scoring and training.

Each step is the trainer's own step, single process: a `PPOLagrangianTrainer` with all six roles
(actor, reference, reward and cost models, reward and cost critics) on DeepSpeed, then
`trainer.rollout(rows)` and `trainer.train_step(rollout)`, as `PPOLagrangianTrainer.train` calls
them. The rollout's time is split by wrapping the trainer module's `sample` with a timer:

* generate: `sample(...)`, i.e. the processor (image transforms, chat template) and
  `actor.generate` with the KV cache;
* score: the rest of `rollout()`: one forward pass over prompt + answer per scoring role: the
  reference's log-probs and the reward and cost models' scores, plus the actor's old log-probs with
  `--old-log-probs-from rollout` and both critics' values with several micro-batches or
  `update_iters > 1` (by default the sampler's logits and the critics' training forward supply them);
* train: `train_step()`: advantages, the lambda update, and per micro-batch one actor and two
  critic updates (forward, backward, optimizer step);
* data: fetching the step's prompt rows (PNG decoding), as `train()` does before `rollout()`.

By default every answer is exactly `--max-new-tokens` long: the actor's generation config gets
`min_new_tokens`, which `generate` merges with the trainer's sampling arguments, so EOS cannot end
an answer early and every step does the same work. `--natural-length` lets EOS stop answers; the
mean answer length is printed either way. The first `--warmup` steps are excluded (allocator
growth, lazy init, first CUDA kernel launches).

Peak memory is the process's peak RSS on CPU (`ru_maxrss`, so building the models and data counts
too; the peak before the first step is printed beside it), and `torch.cuda.max_memory_allocated`
over the measured steps on CUDA.

`--reference-shapes` builds the reference's measured setup (issue 16): LLaVA with a frozen CLIP
vision tower 2 x 128 at 64 px, patch 8 (64 image tokens + CLS), FFN 256; Llama 4 x 512, 8 heads,
FFN 1376; vocabulary 346: 13,634,560 actor parameters; prompts of 119-123 tokens, so sequences of
151-155 with the answer; 4 prompts a step, 32 new tokens, fp32 and ZeRO-0. It compares the
figures with the reference implementation's.

Run: `HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ppo_step.py --help`.
"""

from __future__ import annotations

# First: the package sets OMP_WAIT_POLICY=PASSIVE (unless set), which OpenMP only reads when torch loads it.
import safe_rlhf_v  # noqa: F401

# isort: split
import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import datasets
import torch
from reward_throughput import DEMO_TOKENIZER_ROWS, SHAPES, peak_rss_mib, select_device, shape_spec
from torch import nn
from transformers import AutoProcessor, ProcessorMixin

from safe_rlhf_v.config import PPOStageConfig
from safe_rlhf_v.data.collate import render_prompt
from safe_rlhf_v.data.synthetic import corpus, generate_records, to_dataset
from safe_rlhf_v.models.score import ScoreModel
from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm

if TYPE_CHECKING:  # the train package imports deepspeed, which must wait for select_device
    from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels
    from safe_rlhf_v.train.rollout import Samples


@dataclasses.dataclass(frozen=True)
class ReferencePoint:
    """The public reference implementation as issue 16 measured it, beside this project, on a 2-core
    CPU host without AVX-512: its shapes, and its step time and peak RSS there. Its time on another
    host is unknown (only ratios measured together mean anything), so the goal it sets is printed
    next to the host's CPU."""

    params: int = 13_634_560  # the actor, every weight counted (the vision tower's too)
    sequence_tokens: tuple[int, int] = (151, 155)  # counted prompt + answer tokens, min and max
    prompts: int = 4
    max_new_tokens: int = 32
    seconds_per_step: float = 4.15
    peak_memory_mib: float = 1_527.0
    speedup_goal: float = 2.0


REFERENCE = ReferencePoint()
# CLIP 2 x 128 with patch 8 at 64 px (64 image tokens + CLS), FFN 256 and 4 heads; Llama 4 x 512,
# 8 heads, FFN 1376; a 346-token vocabulary. With these the actor has exactly REFERENCE.params.
REFERENCE_SPEC = TinyVLMSpec(
    image_size=64,
    patch_size=8,
    vision_hidden=128,
    vision_layers=2,
    vision_heads=4,
    vision_ffn=256,
    text_hidden=512,
    text_layers=4,
    text_heads=8,
    text_ffn=1376,
    vocab_size=346,
)
# The reference's prompts are 119-123 tokens (its sequences minus the 32-token answer); the
# synthetic questions make 98-112 at this vocabulary. This instruction, tokenized almost byte by
# byte (18 tokens), lengthens every question, and only rows whose prompt then lands in the
# reference's window are used, so every sequence counts REFERENCE.sequence_tokens.
REFERENCE_QUESTION_PREFIX = "Please look at the image. "
# What --reference-shapes fixes; a conflicting value of one of these flags is an error.
REFERENCE_SETTINGS = {
    "prompts": REFERENCE.prompts,
    "micro_batch": REFERENCE.prompts,
    "max_new_tokens": REFERENCE.max_new_tokens,
    "precision": "fp32",
    "zero_stage": 0,
}
# --rollout-engine's choices and the trainer's engine class each stands for; the run stops if the
# trainer samples through another, so a figure is never credited to the wrong engine.
ROLLOUT_ENGINES = {"hf": "HFEngine"}
DEFAULTS = {"prompts": 4, "max_new_tokens": 32, "precision": "auto", "zero_stage": 0}


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """One measured PPO step, in seconds, with its mean answer length, the shortest and longest
    sequence it trained on (counted prompt + answer tokens) and the memory peak so far."""

    data: float
    generate: float
    score: float
    train: float
    generated_length: float
    min_sequence_tokens: int
    max_sequence_tokens: int
    peak_memory_mib: float

    @property
    def total(self) -> float:
        return self.data + self.generate + self.score + self.train


@dataclasses.dataclass(frozen=True)
class Report:
    """Everything the benchmark prints, JSON-serialisable."""

    device: str
    device_name: str
    host_cpu: str
    torch_threads: int
    omp_wait_policy: str
    model: str
    rollout_engine: str
    actor_params: int
    actor_trained_params: int
    actor_params_without_vocab: int
    all_roles_params: int
    prompts_per_step: int
    micro_batch: int
    max_new_tokens: int
    forced_length: bool
    zero_stage: int
    precision: str
    old_log_probs_from: str
    reuses_training_forward: bool
    sampling_cpu_threads: int | None
    steps: int
    warmup: int
    mean: dict[str, float]
    best: dict[str, float]
    worst: dict[str, float]
    samples_per_s: float
    best_samples_per_s: float
    mean_generated_length: float
    rollout_tokens_per_s: float  # answer tokens sampled per second of `generate`, over the measured steps
    sequence_tokens: tuple[int, int]  # counted prompt + answer tokens over the measured steps
    peak_memory_mib: float
    setup_peak_memory_mib: float | None
    peak_memory_kind: str
    per_step: list[dict[str, float]]
    gflop: dict[str, float] | None  # matrix work of one extra step by part, with --count-flops


def _spec_fields() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(TinyVLMSpec))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options; every `TinyVLMSpec` size becomes a flag (`--text-hidden`, ...) for the built model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--reference-shapes",
        action="store_true",
        help="the reference's 13,634,560-parameter LLaVA, 151-155-token sequences, 4 prompts, 32 new "
        "tokens, fp32, ZeRO-0",
    )
    parser.add_argument(
        "--shape",
        choices=tuple(SHAPES),
        default="demo",
        help="named sizes of the built model (spec flags override single fields; not with "
        "--reference-shapes)",
    )
    parser.add_argument(
        "--rollout-engine",
        choices=tuple(ROLLOUT_ENGINES),
        default="hf",
        help="the engine the trainer samples with; the run stops if it samples through another",
    )
    parser.add_argument("--steps", type=int, default=10, help="measured steps (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before measuring (default 2)")
    parser.add_argument(
        "--count-flops",
        action="store_true",
        help="after the measured steps, count one more step's matrix work (torch.utils.flop_counter)",
    )
    parser.add_argument("--prompts", type=int, help=f"prompts per step (default {DEFAULTS['prompts']})")
    parser.add_argument(
        "--micro-batch",
        type=int,
        help="rows per actor/critic update (default: all prompts, i.e. one actor and two critic updates)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help=f"answer length (default {DEFAULTS['max_new_tokens']})"
    )
    parser.add_argument(
        "--natural-length",
        action="store_true",
        help="let EOS end answers before --max-new-tokens (default: force exactly that many)",
    )
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3))
    parser.add_argument(
        "--old-log-probs-from",
        choices=("generation", "rollout"),
        help="where the actor's old log-probs come from (default: the stage's, generation)",
    )
    parser.add_argument(
        "--sampling-cpu-threads",
        type=int,
        metavar="N",
        help="torch threads while sampling on a CPU, 0 for torch's own count (default: the stage's, 1)",
    )
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    spec = parser.add_argument_group("model sizes (TinyVLMSpec, over --shape; not with --reference-shapes)")
    for field in _spec_fields():
        flag = "--" + field.name.replace("_", "-")
        spec.add_argument(
            flag, type=int, dest=f"spec_{field.name}", metavar="N", help=f"default {field.default}"
        )
    args = parser.parse_args(argv)
    _resolve_settings(parser, args)
    return args


def _resolve_settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill unset options from the defaults or the reference settings, rejecting contradictions."""
    if args.reference_shapes:
        overrides = _spec_overrides(args)
        if overrides:
            flags = ", ".join("--" + name.replace("_", "-") for name in overrides)
            parser.error(f"{flags}: --reference-shapes fixes the model size")
        if args.shape != "demo":
            parser.error(f"--shape {args.shape}: --reference-shapes fixes the model size")
        for name, value in REFERENCE_SETTINGS.items():
            given = getattr(args, name)
            if given is not None and given != value:
                parser.error(f"--reference-shapes runs with --{name.replace('_', '-')} {value}, got {given}")
            setattr(args, name, value)
        if args.natural_length:
            length = REFERENCE.max_new_tokens
            parser.error(f"--reference-shapes generates exactly {length} tokens; drop --natural-length")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.micro_batch is None:
        args.micro_batch = args.prompts
    for name in ("steps", "prompts", "micro_batch", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.prompts % args.micro_batch:
        parser.error(f"--prompts {args.prompts} must be a multiple of --micro-batch {args.micro_batch}")
    if args.sampling_cpu_threads is not None and args.sampling_cpu_threads < 0:
        parser.error(f"--sampling-cpu-threads must be 0 or more, got {args.sampling_cpu_threads}")


def _spec_overrides(args: argparse.Namespace) -> dict[str, int]:
    values = {field.name: getattr(args, f"spec_{field.name}") for field in _spec_fields()}
    return {name: value for name, value in values.items() if value is not None}


def model_spec(args: argparse.Namespace) -> TinyVLMSpec:
    return REFERENCE_SPEC if args.reference_shapes else shape_spec(args.shape, _spec_overrides(args))


def model_name(args: argparse.Namespace) -> str:
    if args.reference_shapes:
        return "reference shapes: " + ", ".join(
            f"{f.name}={getattr(REFERENCE_SPEC, f.name)}"
            for f in _spec_fields()
            if getattr(REFERENCE_SPEC, f.name) != f.default
        )
    sizes = ", ".join(f"{name}={value}" for name, value in _spec_overrides(args).items())
    return f"random-weight LLaVA, shape {args.shape}" + (f" with {sizes}" if sizes else "")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run trains on: the six roles' folders and the prompt rows, with each row's prompt
    tokens as the sampler counts them (image tokens included, no padding)."""

    models: PPOModels
    prompts: datasets.Dataset
    prompt_tokens: list[int]


def build_setup(args: argparse.Namespace, root: Path) -> Setup:
    """The models under `root` and enough prompt rows for every step (and the --count-flops one).

    The tokenizer trains on the synthetic rows' texts as `make-demo-model` does. With
    --reference-shapes the prompts are lengthened and filtered to the reference's window
    (`reference_prompts`); the pool holds twice the rows needed, since about half land in it.
    """
    needed = args.prompts * (args.warmup + args.steps + 1)
    pool = 2 * needed if args.reference_shapes else needed
    records = generate_records(max(DEMO_TOKENIZER_ROWS, pool), seed=args.seed, split="train")
    models = build_models(root / "models", records, model_spec(args), args.seed)
    processor = AutoProcessor.from_pretrained(models.actor)
    if args.reference_shapes:
        records = reference_prompts(processor, records, needed)
    return Setup(models, to_dataset(records), [prompt_tokens(processor, record) for record in records])


def prompt_tokens(processor: ProcessorMixin, record: dict[str, Any]) -> int:
    """The real tokens of the row's prompt as `sample` builds it (chat template, image tokens)."""
    encoded = processor(
        images=[record["image"]], text=[render_prompt(processor, record["question"])], return_tensors="pt"
    )
    return int(encoded["attention_mask"].sum())


def reference_prompts(
    processor: ProcessorMixin, records: list[dict[str, Any]], needed: int
) -> list[dict[str, Any]]:
    """The first `needed` rows whose prompt, with `REFERENCE_QUESTION_PREFIX` before the question,
    plus the forced answer makes a sequence of `REFERENCE.sequence_tokens`."""
    low, high = (total - REFERENCE.max_new_tokens for total in REFERENCE.sequence_tokens)
    kept = []
    for record in records:
        longer = record | {"question": REFERENCE_QUESTION_PREFIX + record["question"]}
        if low <= prompt_tokens(processor, longer) <= high:
            kept.append(longer)
            if len(kept) == needed:
                return kept
    raise SystemExit(
        f"--reference-shapes found {len(kept)} of the {needed} prompts of {low}-{high} tokens it needs "
        f"among {len(records)} rows; REFERENCE_QUESTION_PREFIX no longer fits this tokenizer"
    )


def build_models(root: Path, records: list[dict[str, Any]], spec: TinyVLMSpec, seed: int) -> PPOModels:
    """The policy (tokenizer trained on the rows' texts) plus reward and cost models with fresh heads
    on it, which also start the two critics, as the stage does when no critic model is configured."""
    from safe_rlhf_v.train.ppo_lagrangian import PPOModels

    actor = build_tiny_vlm(root / "actor", corpus(records), spec=spec, seed=seed)
    processor = AutoProcessor.from_pretrained(actor)
    for offset, kind in enumerate(("reward", "cost"), start=1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + offset)  # the two heads differ, as trained ones would
            ScoreModel.from_base(actor, kind).save(root / kind, processor=processor)
    return PPOModels.critics_from_scores(str(actor), str(root / "reward"), str(root / "cost"))


def stage_config(args: argparse.Namespace) -> PPOStageConfig:
    """The stage's defaults, with the benchmark's batch geometry, length, ZeRO stage and precision,
    and the two speed settings when given; --reference-shapes freezes the actor's vision tower, as
    the reference does.

    Frozen roles follow the trained ones into ZeRO-3 (partitioned) and stay whole otherwise.
    """
    defaults = PPOStageConfig()
    speed: dict[str, Any] = {}
    if args.old_log_probs_from is not None:
        speed["old_log_probs_from"] = args.old_log_probs_from
    if args.sampling_cpu_threads is not None:
        speed["sampling_cpu_threads"] = args.sampling_cpu_threads or None
    shape = {"actor_freeze_vision_tower": True} if args.reference_shapes else {}
    train = {
        "per_device_batch_size": args.micro_batch,
        "zero_stage": args.zero_stage,
        "precision": args.precision,
        "max_steps": args.warmup + args.steps,
        "seed": args.seed,
    }
    return defaults.model_copy(
        update={
            "actor": defaults.actor.model_copy(update=train),
            "critic": defaults.critic.model_copy(update=train),
            "generation": defaults.generation.model_copy(update={"max_new_tokens": args.max_new_tokens}),
            "prompt_batch_size": args.prompts,
            "frozen_zero_stage": 3 if args.zero_stage == 3 else 0,
        }
        | speed
        | shape
    )


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all, without the token embedding table and the LM head): the second is what the vocabulary
    size does not change. Full sizes under ZeRO-3, where local tensors are empty partitions."""
    vocab = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if output is not None:
        vocab.add(id(output.weight))
    sizes = {id(p): int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()}
    return sum(sizes.values()), sum(size for key, size in sizes.items() if key not in vocab)


def trained_params(model: nn.Module) -> int:
    """Parameters the optimizer updates (full sizes under ZeRO-3)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters() if p.requires_grad)


def check_reference_actor(params: int, trained: int, vision_params: int) -> None:
    """Stop when --reference-shapes did not build the reference's actor: its exact parameter count,
    with the vision tower's weights frozen."""
    if params != REFERENCE.params:
        raise SystemExit(
            f"--reference-shapes built an actor of {params:,} parameters, not the reference's "
            f"{REFERENCE.params:,}; REFERENCE_SPEC no longer matches the reference model"
        )
    if params - trained != vision_params:
        raise SystemExit(
            f"--reference-shapes trains {trained:,} of {params:,} actor parameters; the reference freezes "
            f"exactly the vision tower's {vision_params:,}"
        )


def host_cpu() -> str:
    """The host CPU's model and the extensions that decide its matrix speed (AVX2, AVX-512, AMX),
    from /proc/cpuinfo: CPU figures only compare between runs on the same kind of host."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)  # the last CPU's, like the first's
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    marks = {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "amx": any(flag.startswith("amx") for flag in flags),
    }
    return f"{model}, {os.cpu_count()} logical CPUs, " + ", ".join(
        f"{name} {'yes' if present else 'no'}" for name, present in marks.items()
    )


class SampleTimer:
    """Stands in for `sample` inside the trainer module, adding up the seconds spent in it.

    On CUDA it synchronises around the call so that queued kernels are charged to the right part.
    """

    def __init__(self, sample: Callable[..., Any], synchronize: Callable[[], None]) -> None:
        self.sample = sample
        self.synchronize = synchronize
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.synchronize()
        start = time.perf_counter()
        result = self.sample(*args, **kwargs)
        self.synchronize()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return result


def peak_memory_mib(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()


def count_step_flops(trainer: PPOLagrangianTrainer, rows: list[dict[str, Any]]) -> dict[str, float]:
    """GFLOP of one PPO step by part, counted by `torch.utils.flop_counter` (matrix products and
    attention, forward and backward), with the same split as the timings: `sample` is wrapped the
    way `SampleTimer` wraps it. The step also trains, so it runs after the measured ones."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = trainer.engine.sample
    counted: dict[str, float] = {}

    def counting_sample(*args: Any, **kwargs: Any) -> Samples:
        with FlopCounterMode(display=False) as inner:
            result = sample(*args, **kwargs)
        counted["generate"] = inner.get_total_flops() / 1e9
        return result

    with (
        mock.patch.object(trainer.engine, "sample", counting_sample),
        FlopCounterMode(display=False) as outer,
    ):
        rollout = trainer.rollout(rows)  # the outer mode sees the sampler's work too
    counted["score"] = outer.get_total_flops() / 1e9 - counted["generate"]
    with FlopCounterMode(display=False) as training:
        trainer.train_step(rollout)
    counted["train"] = training.get_total_flops() / 1e9
    counted["total"] = counted["generate"] + counted["score"] + counted["train"]
    return counted


def run_steps(trainer: PPOLagrangianTrainer, args: argparse.Namespace) -> tuple[list[StepTimes], float]:
    """Run `warmup + steps` PPO steps on batches of the trainer's own shuffled prompts.

    Returns the measured steps and the memory peak before the first step.
    """
    cuda = trainer.dist.device.type == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    setup_peak = peak_memory_mib(cuda)
    trainer.stream.sampler.set_epoch(0)
    order = list(trainer.stream.sampler)
    measured: list[StepTimes] = []
    timer = SampleTimer(trainer.engine.sample, synchronize)
    with mock.patch.object(trainer.engine, "sample", timer):
        for step in range(args.warmup + args.steps):
            if cuda and step == args.warmup:
                torch.cuda.reset_peak_memory_stats()
            timer.seconds, timer.calls = 0.0, 0
            synchronize()
            t0 = time.perf_counter()
            rows = [trainer.prompts[i] for i in order[step * args.prompts : (step + 1) * args.prompts]]
            t1 = time.perf_counter()
            rollout = trainer.rollout(rows)
            synchronize()
            t2 = time.perf_counter()
            if timer.calls != 1:
                raise RuntimeError(
                    f"rollout() called trainer.engine.sample {timer.calls} times, not once: the "
                    "trainer no longer samples through its engine, so generation cannot be timed"
                )
            metrics = trainer.train_step(rollout)
            synchronize()
            t3 = time.perf_counter()
            trainer.step += 1  # as train() does: the lambda update's delay counts steps
            sequence_tokens = rollout.inputs["attention_mask"].sum(dim=1)
            times = StepTimes(
                data=t1 - t0,
                generate=timer.seconds,
                score=t2 - t1 - timer.seconds,
                train=t3 - t2,
                generated_length=metrics["generated_length"],
                min_sequence_tokens=int(sequence_tokens.min()),
                max_sequence_tokens=int(sequence_tokens.max()),
                peak_memory_mib=peak_memory_mib(cuda),
            )
            print(format_step(step, args, times), flush=True)
            if step >= args.warmup:
                measured.append(times)
    return measured, setup_peak


def format_step(step: int, args: argparse.Namespace, t: StepTimes) -> str:
    label = "warmup" if step < args.warmup else "step"
    return (
        f"{label} {step + 1:>3}  {t.total:7.3f} s = data {t.data:.3f} + generate {t.generate:.3f} + "
        f"score {t.score:.3f} + train {t.train:.3f}  |  {args.prompts / t.total:6.2f} samples/s  |  "
        f"answer {t.generated_length:.1f} tokens, sequences {t.min_sequence_tokens}-"
        f"{t.max_sequence_tokens}  |  peak {t.peak_memory_mib:,.0f} MiB"
    )


PARTS = ("data", "generate", "score", "train", "total")


def _by_part(measured: list[StepTimes], reduce: Callable[[list[float]], float]) -> dict[str, float]:
    return {part: reduce([getattr(t, part) for t in measured]) for part in PARTS}


def run(args: argparse.Namespace, root: Path) -> Report:
    """Build the data, the six roles and the trainer under `root`, then time the steps."""
    from safe_rlhf_v.train.integrity import ephemeral_key
    from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer

    steps = args.warmup + args.steps
    setup = build_setup(args, root)
    trainer = PPOLagrangianTrainer(
        stage_config(args),
        setup.models,
        setup.prompts,
        variant="safe-rlhf-v",
        checkpoint_dir=root / "checkpoints",
        checkpoint_key=ephemeral_key(),
    )
    if trainer.dist.world_size != 1 or trainer.dist.device.type != args.device:
        raise SystemExit(
            f"expected one process on {args.device}, got {trainer.dist.world_size} on {trainer.dist.device}: "
            "run the benchmark as a single plain python process"
        )
    engine_class = type(trainer.engine).__name__
    if engine_class != ROLLOUT_ENGINES[args.rollout_engine]:
        raise SystemExit(
            f"--rollout-engine {args.rollout_engine} expects the trainer to sample with "
            f"{ROLLOUT_ENGINES[args.rollout_engine]}, but it samples with {engine_class}"
        )
    actor = trainer.roles.actor.module
    actor_params, actor_core = count_params(actor)
    actor_trained = trained_params(actor)
    if args.reference_shapes:
        check_reference_actor(actor_params, actor_trained, count_params(actor.base_model.vision_tower)[0])
    if not args.natural_length:
        actor.generation_config.min_new_tokens = args.max_new_tokens
    roles = trainer.roles
    engines = (roles.reference, roles.reward_model, roles.cost_model, *roles.trained().values())
    measured, setup_peak = run_steps(trainer, args)
    gflop = None
    if args.count_flops:
        order = list(trainer.stream.sampler)
        batch = order[steps * args.prompts : (steps + 1) * args.prompts]
        gflop = count_step_flops(trainer, [trainer.prompts[i] for i in batch])
    cuda = args.device == "cuda"
    mean = _by_part(measured, statistics.fmean)
    best = _by_part(measured, min)
    return Report(
        device=args.device,
        device_name=torch.cuda.get_device_name() if cuda else "the host CPU",
        host_cpu=host_cpu(),
        torch_threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        model=model_name(args),
        rollout_engine=f"{args.rollout_engine} ({engine_class})",
        actor_params=actor_params,
        actor_trained_params=actor_trained,
        actor_params_without_vocab=actor_core,
        all_roles_params=sum(count_params(engine.module)[0] for engine in engines),
        prompts_per_step=args.prompts,
        micro_batch=args.micro_batch,
        max_new_tokens=args.max_new_tokens,
        forced_length=not args.natural_length,
        zero_stage=args.zero_stage,
        precision="bf16" if trainer.roles.actor.dtype == torch.bfloat16 else "fp32",
        old_log_probs_from=trainer.cfg.old_log_probs_from,
        reuses_training_forward=trainer.reuse_training_forward,
        sampling_cpu_threads=trainer.cfg.sampling_cpu_threads,
        steps=len(measured),
        warmup=args.warmup,
        mean=mean,
        best=best,
        worst=_by_part(measured, max),
        samples_per_s=args.prompts / mean["total"],
        best_samples_per_s=args.prompts / best["total"],
        mean_generated_length=statistics.fmean(t.generated_length for t in measured),
        rollout_tokens_per_s=args.prompts
        * sum(t.generated_length for t in measured)
        / sum(t.generate for t in measured),
        sequence_tokens=(
            min(t.min_sequence_tokens for t in measured),
            max(t.max_sequence_tokens for t in measured),
        ),
        peak_memory_mib=peak_memory_mib(cuda),
        setup_peak_memory_mib=None if cuda else setup_peak,
        peak_memory_kind="torch.cuda.max_memory_allocated" if cuda else "process peak RSS (ru_maxrss)",
        per_step=[dataclasses.asdict(t) | {"total": t.total} for t in measured],
        gflop=gflop,
    )


def reuse_line(r: Report) -> str:
    """Where the old log-probs and values come from: scoring passes in the rollout, or the numbers
    computed anyway (the sampler's logits, the critics' training forward)."""
    log_probs = "the sampler's logits" if r.old_log_probs_from == "generation" else "a rollout pass"
    values = "their training forward" if r.reuses_training_forward else "rollout passes"
    return f"actor's old log-probs from {log_probs}, critics' old values from {values}"


def format_report(r: Report, reference: bool) -> str:
    """The human-readable summary, and with `reference` the comparison with the reference point."""
    length = "forced" if r.forced_length else "EOS may stop answers early"
    setup = "" if r.setup_peak_memory_mib is None else f"; {r.setup_peak_memory_mib:,.0f} MiB before step 1"

    def row(name: str) -> str:
        return (
            f"  {name:<9} mean {r.mean[name]:7.3f}  best {r.best[name]:7.3f}  worst {r.worst[name]:7.3f}  "
            f"({r.mean[name] / r.mean['total']:.0%} of the mean step)"
        )

    lines = [
        f"device        {r.device} ({r.device_name}), torch threads {r.torch_threads}, "
        f"OMP_WAIT_POLICY {r.omp_wait_policy}",
        f"host CPU      {r.host_cpu}",
        f"model         {r.model}",
        f"parameters    actor {r.actor_params:,}, {r.actor_trained_params:,} of them trained "
        f"({r.actor_params_without_vocab:,} without token embeddings and LM head); six roles "
        f"{r.all_roles_params:,}",
        f"sequences     {r.sequence_tokens[0]}-{r.sequence_tokens[1]} tokens (prompt + answer, counted)",
        f"setup         {r.prompts_per_step} prompts/step, micro-batch {r.micro_batch}, "
        f"{r.max_new_tokens} new tokens ({length}), ZeRO-{r.zero_stage}, {r.precision}, "
        f"{r.steps} steps measured after {r.warmup} warmup",
        f"work order    {reuse_line(r)}; sampling on {r.sampling_cpu_threads or 'all'} CPU thread(s)",
        "seconds/step",
        *(row(name) for name in PARTS),
        f"samples/s     {r.samples_per_s:.2f} (mean step), {r.best_samples_per_s:.2f} (best step)",
        f"answer length {r.mean_generated_length:.1f} tokens on average",
        f"rollout       {r.rollout_tokens_per_s:,.1f} answer tokens/s while generating ({r.rollout_engine})",
        f"peak memory   {r.peak_memory_mib:,.0f} MiB ({r.peak_memory_kind}{setup})",
    ]
    if r.gflop is not None:
        parts = ("generate", "score", "train")
        lines += [
            "matrix work   "
            + " + ".join(f"{part} {r.gflop[part]:.1f}" for part in parts)
            + f" = {r.gflop['total']:.1f} GFLOP a step (one extra step, torch.utils.flop_counter)",
            "rate          "
            + ", ".join(f"{part} {r.gflop[part] / r.mean[part]:.0f}" for part in (*parts, "total"))
            + " GFLOP/s at the mean times",
        ]
    if reference:
        goal = REFERENCE.seconds_per_step / REFERENCE.speedup_goal
        fast = r.mean["total"] <= goal
        small = r.peak_memory_mib <= REFERENCE.peak_memory_mib
        low, high = REFERENCE.sequence_tokens
        shaped = low <= r.sequence_tokens[0] and r.sequence_tokens[1] <= high
        lines += [
            f"reference     {REFERENCE.params:,} actor parameters, sequences {low}-{high} tokens: "
            f"{'matched' if shaped and r.actor_params == REFERENCE.params else 'MISMATCH'}",
            f"reference     {REFERENCE.seconds_per_step} s/step, "
            f"{REFERENCE.peak_memory_mib:,.0f} MiB peak RSS, measured beside this project on a "
            "2-core host without AVX-512 (issue 16); on another host only a side-by-side run compares",
            f"speed-up      {REFERENCE.seconds_per_step / r.mean['total']:.2f}x on the mean step, "
            f"{REFERENCE.seconds_per_step / r.best['total']:.2f}x on the best",
            f"goal          <= {goal:.3f} s/step at <= {REFERENCE.peak_memory_mib:,.0f} MiB: "
            f"time {'met' if fast else 'NOT met'}, memory {'met' if small else 'NOT met'}",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    select_device(args.device)
    with tempfile.TemporaryDirectory(prefix="ppo-step-") as tmp:
        report = run(args, Path(tmp))
    print(format_report(report, args.reference_shapes))
    if args.json:
        print(json.dumps(dataclasses.asdict(report), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
