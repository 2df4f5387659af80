"""The vLLM rollout engine against Hugging Face `generate`, on a tiny LLaVA, in `.venv-vllm`.

Skipped when `.venv-vllm` (`make vllm-env`) is absent: vLLM's pins clash with the training venv.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from safe_rlhf_v.config import GenerationConfig
from safe_rlhf_v.train.rollout_engine import HFEngine, PromptBatch, RolloutServerError, VLLMEngine

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(), reason=f"no {VLLM_PYTHON}: run `make vllm-env` to test the vLLM engine"
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> Path:
    """A tiny LLaVA whose text head size (32) vLLM's CPU attention supports; the shared fixture's 16
    it does not ("Unsupported CPU attention configuration")."""
    from safe_rlhf_v.data.sources import load_split
    from safe_rlhf_v.data.synthetic import corpus
    from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm

    spec = TinyVLMSpec(text_hidden=64, text_heads=2, text_ffn=128, vocab_size=512)
    out = tmp_path_factory.mktemp("vllm-models") / "tiny"
    return build_tiny_vlm(out, corpus(load_split(str(demo_data), "train")), spec=spec, seed=0)


@pytest.fixture(scope="module")
def batch() -> PromptBatch:
    images = [Image.new("RGB", (40 + 8 * i, 30), (60 * i, 100, 200 - 50 * i)) for i in range(3)]
    return PromptBatch(images, ["What is this?", "Is it safe to do that here", "hi"])


def _engines(
    model_dir: Path, generation: GenerationConfig
) -> Iterator[tuple[torch.nn.Module, HFEngine, VLLMEngine]]:
    actor = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    hf = HFEngine(actor, processor, generation, device=CPU, dtype=torch.float32)
    vllm = VLLMEngine(actor, processor, generation, python=VLLM_PYTHON, device=CPU, dtype=torch.float32)
    try:
        yield actor, hf, vllm
    finally:
        vllm.close()


def _perturb(actor: torch.nn.Module, seed: int) -> None:
    """A stand-in for an optimizer step: every weight moves, the vision tower's included."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in actor.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_greedy_answers_and_log_probs_match_generate_across_weight_updates(
    vllm_model: Path, batch: PromptBatch
) -> None:
    generation = GenerationConfig(max_new_tokens=12, temperature=0.0, top_p=1.0)
    for actor, hf, vllm in _engines(vllm_model, generation):
        for update in range(3):  # the initial weights, then after each of two updates
            expected, got = hf.sample(batch), vllm.sample(batch)
            assert got.prompt_length == expected.prompt_length
            assert set(got.inputs) == set(expected.inputs)
            for key, value in expected.inputs.items():
                assert torch.equal(got.inputs[key], value), f"{key} differs after {update} updates"
            assert torch.equal(got.response_mask, expected.response_mask)
            assert got.log_probs is not None and expected.log_probs is not None
            gap = (got.log_probs - expected.log_probs).abs().max().item()
            assert gap <= 1e-4, f"log-prob gap {gap} after {update} updates"
            _perturb(actor, seed=update)
            vllm.update_weights(actor)
            hf.update_weights(actor)


def test_sampled_log_probs_are_the_policys_at_the_sampling_temperature(
    vllm_model: Path, batch: PromptBatch
) -> None:
    """At T != 1 the server's log-probs are log softmax(logits / T) of the tokens it drew, which an
    HF forward over the same tokens reproduces."""
    from safe_rlhf_v.train.rollout import response_logits, token_log_probs

    generation = GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=0.9)
    for actor, _, vllm in _engines(vllm_model, generation):
        got = vllm.sample(batch)
        with torch.no_grad():
            logits = response_logits(actor, got.inputs, got.prompt_length, temperature=0.7)
        tokens = got.inputs["input_ids"][:, got.prompt_length :]
        expected = token_log_probs(logits, tokens) * got.response_mask
        assert got.log_probs is not None
        assert (got.log_probs - expected).abs().max().item() <= 1e-4


def test_a_killed_server_is_a_one_line_error_naming_it(vllm_model: Path, batch: PromptBatch) -> None:
    generation = GenerationConfig(max_new_tokens=4, temperature=0.0, top_p=1.0)
    for actor, _, vllm in _engines(vllm_model, generation):
        vllm.process.kill()
        vllm.process.wait()
        with pytest.raises(
            RolloutServerError, match=rf"vLLM rollout server \(pid {vllm.process.pid}\) exited"
        ) as error:
            vllm.sample(batch)
        assert "\n" not in str(error.value)
        with pytest.raises(RolloutServerError, match="exited"):
            vllm.update_weights(actor)


def test_ppo_steps_with_vllm_rollouts_follow_the_hf_trajectory_at_temperature_0(
    tmp_path: Path, vllm_model: Path, demo_data: Path
) -> None:
    """Greedy rollouts are the same answers from either engine, so three PPO steps give the same
    lambda and J_C; the vLLM run only matches if every step's new weights reached the server."""
    from mlp_training import KEY

    from safe_rlhf_v.config import PPOStageConfig
    from safe_rlhf_v.data.sources import load_split
    from safe_rlhf_v.models.score import ScoreModel
    from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels

    processor = AutoProcessor.from_pretrained(vllm_model)
    for seed, kind in enumerate(("reward", "cost"), start=1):
        torch.manual_seed(seed)
        ScoreModel.from_base(str(vllm_model), kind).save(tmp_path / kind, processor=processor)
    models = PPOModels.critics_from_scores(str(vllm_model), str(tmp_path / "reward"), str(tmp_path / "cost"))
    prompts = load_split(str(demo_data), "train").select(range(6))
    train = {"epochs": 1, "per_device_batch_size": 2, "learning_rate": 1e-3, "precision": "fp32"}
    trajectories = {}
    for engine in ("hf", "vllm"):
        cfg = PPOStageConfig.model_validate(
            {
                "actor": train | {"max_steps": 3},
                "critic": train,
                "generation": {"max_new_tokens": 6, "temperature": 0.0},
                "prompt_batch_size": 2,
                "rollout": {"engine": engine, "vllm_python": str(VLLM_PYTHON)},
            }
        )
        trainer = PPOLagrangianTrainer(
            cfg, models, prompts, variant="safe-rlhf-v", checkpoint_dir=tmp_path / engine, checkpoint_key=KEY
        )
        try:
            trainer.train()
        finally:
            trainer.close()
        trajectories[engine] = [row[key] for row in trainer.history for key in ("lambda", "J_C")]
    assert len(trajectories["hf"]) == 6  # lambda and J_C of each of the three steps
    assert trajectories["vllm"] == pytest.approx(trajectories["hf"], abs=1e-4)
