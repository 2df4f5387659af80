"""The benchmarks build what they claim to measure, and the prepared GPU check is runnable.

No timings here: speed is what the benchmarks print, never an assertion.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from safe_rlhf_v.train.ppo_lagrangian import freeze_vision_tower

ROOT = Path(__file__).resolve().parents[1]


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
    env = os.environ | {"PYTHON": sys.executable, "OUT": str(out)}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "MISSING" not in done.stdout
    for part, command in (
        ("nvidia-smi", "nvidia-smi"),
        ("cuda-smoke", "benchmarks/cuda_smoke.py"),
        ("ppo-step", "benchmarks/ppo_step.py --device cuda --reference-shapes"),
        ("bf16-precision", "tests/test_inference_precision.py"),
    ):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(f"{part} "))
        assert "timeout" in line and command in line, line
    assert not out.exists(), "a dry run writes nothing"


def test_the_gpu_check_dry_run_fails_on_a_missing_interpreter(tmp_path: Path) -> None:
    env = os.environ | {"PYTHON": str(tmp_path / "no-python"), "OUT": str(tmp_path / "out")}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "MISSING interpreter" in done.stdout
