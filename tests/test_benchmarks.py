"""The benchmarks build what they claim to measure, and the prepared GPU check is runnable.

No timings here: speed is what the benchmarks print, never an assertion.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from safe_rlhf_v.data.synthetic import corpus, generate_records
from safe_rlhf_v.models.tiny import FAMILIES
from safe_rlhf_v.train.ppo_lagrangian import freeze_vision_tower

ROOT = Path(__file__).resolve().parents[1]


GPU_CHECK_PARTS = (
    ("nvidia-smi", "nvidia-smi"),
    ("cuda-smoke", "benchmarks/cuda_smoke.py"),
    ("ppo-step", "benchmarks/ppo_step.py --device cuda --reference-shapes"),
    ("bf16-precision", "tests/test_inference_precision.py"),
    ("reward-7b-zero2", "benchmarks/reward_throughput.py --device cuda --shape 7b-like"),
    ("reward-7b-zero3", "benchmarks/reward_throughput.py --device cuda --shape 7b-like"),
    ("ppo-1b-hf", "benchmarks/ppo_step.py --device cuda --shape 1b"),
    ("ppo-1b-vllm", "benchmarks/ppo_step.py --device cuda --shape 1b"),
)


def dry_run(root: Path, python: str, out: Path) -> subprocess.CompletedProcess[str]:
    """`gpu_check.sh --dry-run` from the checkout at `root` (it reads every path from there)."""
    return subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHON": python, "OUT": str(out)},
        timeout=300,  # each benchmark's --help imports torch and transformers
        check=False,
    )


@pytest.fixture(scope="module")
def ppo_step() -> ModuleType:
    """benchmarks/ppo_step.py as a module (it imports its sibling reward_throughput by name)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("ppo_step")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_reference_shapes_build_the_reference_setup(tmp_path: Path, ppo_step: ModuleType) -> None:
    """The reference's measured setup: patch 8 (64 image tokens), vocabulary 346, vision FFN 256,
    13,634,560 actor parameters with the vision tower frozen, sequences of 151-155 tokens."""
    args = ppo_step.parse_args(["--reference-shapes", "--steps", "1", "--warmup", "0"])
    setup = ppo_step.build_setup(args, tmp_path)
    actor = AutoModelForImageTextToText.from_pretrained(setup.models.actor)
    processor = AutoProcessor.from_pretrained(setup.models.actor)
    vision = actor.config.vision_config
    assert (vision.patch_size, vision.image_size, vision.intermediate_size) == (8, 64, 256)
    assert actor.config.text_config.vocab_size == len(processor.tokenizer) == 346
    params, _ = ppo_step.count_params(actor)
    assert params == ppo_step.REFERENCE.params == 13_634_560

    assert ppo_step.stage_config(args).actor_freeze_vision_tower
    freeze_vision_tower(actor)
    tower = ppo_step.count_params(actor.model.vision_tower)[0]
    ppo_step.check_reference_actor(params, ppo_step.trained_params(actor), tower)  # no SystemExit
    assert ppo_step.trained_params(actor) == params - tower

    assert len(setup.prompts) == len(setup.prompt_tokens) == args.prompts * 2  # 1 step + the FLOP step
    row = setup.prompts[0]
    encoded = processor(images=[row["image"]], text=[ppo_step.render_prompt(processor, row["question"])])
    assert encoded["input_ids"][0].count(processor.image_token_id) == 64
    assert sum(encoded["attention_mask"][0]) == setup.prompt_tokens[0]
    sequences = [tokens + args.max_new_tokens for tokens in setup.prompt_tokens]
    assert min(sequences) >= 151 and max(sequences) <= 155


def test_a_wrong_actor_stops_the_reference_benchmark(ppo_step: ModuleType) -> None:
    params = ppo_step.REFERENCE.params
    with pytest.raises(SystemExit, match="not the reference's 13,634,560"):
        ppo_step.check_reference_actor(params + 1, params - 10, 10)
    with pytest.raises(SystemExit, match="the reference freezes exactly the vision tower"):
        ppo_step.check_reference_actor(params, params, 10)


def test_the_host_cpu_line_names_the_model_and_the_matrix_extensions(ppo_step: ModuleType) -> None:
    line = ppo_step.host_cpu()
    for extension in ("avx2", "avx512f", "amx"):
        assert f"{extension} yes" in line or f"{extension} no" in line
    assert f"{os.cpu_count()} logical CPUs" in line


def test_the_gpu_check_dry_run_plans_every_part_and_runs_none(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = dry_run(ROOT, sys.executable, out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MISSING" not in done.stdout and "BROKEN" not in done.stdout
    lines = done.stdout.splitlines()
    for part, command in GPU_CHECK_PARTS:
        line = next(line for line in lines if line.strip().startswith(f"{part} "))
        assert "timeout" in line and command in line, line
    vllm = next(line for line in lines if line.strip().startswith("ppo-1b-vllm "))
    assert "runs only when .venv-vllm exists" in vllm and "--rollout-engine vllm" in vllm
    assert not out.exists(), "a dry run writes nothing"


def test_the_gpu_check_bounds_fit_eight_minutes(tmp_path: Path) -> None:
    """Issue 16: the whole check finishes within 8 minutes on one H200, so the parts' own bounds
    must fit under the total the script enforces, and that total under 480 s."""
    done = dry_run(ROOT, sys.executable, tmp_path / "out")
    total = int(re.search(r"total bound (\d+)s", done.stdout).group(1))
    bounds = [int(seconds) for seconds in re.findall(r"\(timeout (\d+)s\)", done.stdout)]
    assert len(bounds) == len(GPU_CHECK_PARTS)
    assert sum(bounds) <= total <= 480, (bounds, total)


def test_the_gpu_check_dry_run_fails_on_a_renamed_flag(tmp_path: Path) -> None:
    """A flag the plan passes but a benchmark no longer has must fail the dry run, not the GPU run."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "benchmarks", root / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tests").mkdir()
    shutil.copy(ROOT / "tests" / "test_inference_precision.py", root / "tests")
    (root / "src").symlink_to(ROOT / "src")
    script = root / "benchmarks" / "reward_throughput.py"
    script.write_text(script.read_text().replace('"--gradient-checkpointing"', '"--grad-ckpt"'))
    done = dry_run(root, sys.executable, tmp_path / "out")
    assert done.returncode == 1, done.stdout + done.stderr
    missing = [line for line in done.stdout.splitlines() if line.startswith("MISSING")]
    assert missing == [
        f"MISSING flag --gradient-checkpointing in benchmarks/reward_throughput.py --help, needed by {part}"
        for part in ("reward-7b-zero2", "reward-7b-zero3")
    ]


def test_the_gpu_check_dry_run_fails_on_a_missing_interpreter(tmp_path: Path) -> None:
    done = dry_run(ROOT, str(tmp_path / "no-python"), tmp_path / "out")
    assert done.returncode == 1
    assert "MISSING interpreter" in done.stdout


@pytest.fixture(scope="module")
def reward_throughput() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("reward_throughput")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _meta_llava(spec: object) -> torch.nn.Module:
    """The LLaVA a shape builds, on the meta device: its real parameter shapes, no memory."""
    texts = corpus(generate_records(50, seed=0, split="train"))
    config = FAMILIES["llava"](texts, spec).config
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def test_the_7b_like_shape_has_llava_7b_layers(reward_throughput: ModuleType) -> None:
    """Its matrix shapes are LLaVA-1.5-7B's: Llama-7B's decoder layer (202,383,360 weights) and
    CLIP ViT-L/14 at 336 px (576 image tokens), only fewer decoder layers."""
    spec = reward_throughput.SHAPES["7b-like"]
    model = _meta_llava(spec)
    layer = model.model.language_model.layers[0]
    assert sum(p.numel() for p in layer.parameters()) == 202_383_360
    assert spec.num_image_tokens == 576
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert 300e6 < tower < 310e6  # ViT-L/14: about 303 M


def test_the_1b_shape_builds_a_one_to_two_billion_actor(reward_throughput: ModuleType) -> None:
    model = _meta_llava(reward_throughput.SHAPES["1b"])
    assert 1e9 < sum(p.numel() for p in model.parameters()) < 2e9


def test_spec_flags_override_single_fields_of_a_shape(
    reward_throughput: ModuleType, ppo_step: ModuleType
) -> None:
    args = reward_throughput.parse_args(["--shape", "7b-like", "--text-layers", "2"])
    spec = reward_throughput.shape_spec(args.shape, reward_throughput._spec_overrides(args))
    assert spec.text_layers == 2 and spec.text_hidden == 4096
    ppo_args = ppo_step.parse_args(["--shape", "1b", "--text-hidden", "64"])
    assert ppo_step.model_spec(ppo_args).text_hidden == 64
    assert ppo_step.model_spec(ppo_args).text_layers == 24


def test_a_shape_conflicts_with_a_given_model_or_the_reference_shapes(
    reward_throughput: ModuleType, ppo_step: ModuleType
) -> None:
    with pytest.raises(SystemExit):
        reward_throughput.parse_args(["--model", "somewhere", "--shape", "7b-like"])
    with pytest.raises(SystemExit):
        ppo_step.parse_args(["--reference-shapes", "--shape", "1b"])
