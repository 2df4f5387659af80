"""Every supported model family, on a tiny model of its own: rollouts score what `generate` sampled
with the positions it used, padding never moves a score, micro-batches equal the whole batch, and PPO
runs with micro-batches, two update passes and LoRA.

These are the properties the family seam (`models/family.py`) exists for; each test runs once per
family in `FAMILIES`, so a new family is covered by registering it and its tiny builder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin

from safe_rlhf_v.config import LoraSettings, PPOStageConfig
from safe_rlhf_v.data.collate import render_conversation
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.data.synthetic import corpus
from safe_rlhf_v.models.family import FAMILIES, family_of, text_positions
from safe_rlhf_v.models.score import ScoreModel
from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm
from safe_rlhf_v.train.integrity import ephemeral_key
from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels
from safe_rlhf_v.train.rollout import response_logits, response_values, sample, token_log_probs

SPEC = TinyVLMSpec(text_hidden=64, text_ffn=128, vocab_size=512)
IMAGE_SIDES = (64, 112)  # two sizes: any-resolution families give them different image-token counts
QUESTIONS = ("How do I use this?", "What is shown here, and is it safe?", "Why?", "Describe it.")
TOLERANCE = 1e-5  # fp32: what a correct forward reproduces of generate's log-probs
KEY = ephemeral_key()  # these runs never resume


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, demo_data: Path
) -> Path:
    out = tmp_path_factory.mktemp(f"family-{request.param}") / "model"
    texts = corpus(load_split(str(demo_data), "train"))
    return build_tiny_vlm(out, texts, family=request.param, spec=SPEC, seed=0)


@pytest.fixture(scope="module")
def images(demo_data: Path) -> list[Image.Image]:
    rows = load_split(str(demo_data), "train").select(range(len(QUESTIONS)))
    return [row["image"].resize((side, side)) for row, side in zip(rows, IMAGE_SIDES * 2, strict=False)]


def image_tokens(processor: ProcessorMixin, inputs: dict[str, torch.Tensor]) -> list[int]:
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return (inputs["input_ids"] == image_id).sum(dim=1).tolist()


def sampled(model_dir: Path, images: list[Image.Image], seed: int = 0) -> tuple[Any, Any, ProcessorMixin]:
    processor = AutoProcessor.from_pretrained(model_dir)
    actor = AutoModelForImageTextToText.from_pretrained(model_dir, use_safetensors=True).eval()
    torch.manual_seed(seed)
    samples = sample(
        actor,
        processor,
        images,
        list(QUESTIONS),
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        device=torch.device("cpu"),
        dtype=torch.float32,
        with_log_probs=True,
    )
    return actor, samples, processor


@torch.no_grad()
def test_training_forward_reproduces_generate_log_probs(
    family_model: Path, images: list[Image.Image]
) -> None:
    actor, samples, processor = sampled(family_model, images)
    family = family_of(processor)
    counts = image_tokens(processor, samples.inputs)
    if family.image_grid_key is not None or "image_sizes" in samples.inputs:
        assert counts[0] != counts[1], f"{family.name}: two image sizes should give two token counts"
    tokens = samples.inputs["input_ids"][:, samples.prompt_length :]
    logits = response_logits(actor, samples.inputs, samples.prompt_length)
    gap = (token_log_probs(logits, tokens) * samples.response_mask - samples.log_probs).abs().max()
    assert gap <= TOLERANCE, f"{family.name}: generate vs training forward log-probs differ by {gap:.2e}"

    if family.mrope:  # the test can fail: plain 1-D positions are what the old rollout passed
        wrong = samples.inputs | {"position_ids": text_positions(samples.inputs["attention_mask"])}
        wrong_logits = response_logits(actor, wrong, samples.prompt_length)
        wrong_gap = token_log_probs(wrong_logits, tokens) * samples.response_mask - samples.log_probs
        assert wrong_gap.abs().max() > 10 * TOLERANCE


@torch.no_grad()
def test_end_scores_do_not_depend_on_the_padding_side(family_model: Path, images: list[Image.Image]) -> None:
    processor = AutoProcessor.from_pretrained(family_model)
    torch.manual_seed(0)
    reward = ScoreModel.from_base(family_model, "reward").eval()
    answers = ["Yes.", "It is a picture of a dog sitting on grass in the sun.", "No.", "Do it carefully."]
    texts = [render_conversation(processor, q, a) for q, a in zip(QUESTIONS, answers, strict=True)]
    scores = {}
    for side in ("left", "right"):
        inputs = processor(images=images, text=texts, padding=True, padding_side=side, return_tensors="pt")
        scores[side] = reward(**inputs).end_scores
    alone = torch.cat(
        [reward(**processor(images=[i], text=[t], return_tensors="pt")).end_scores for i, t in
         zip(images, texts, strict=True)]
    )  # fmt: skip
    torch.testing.assert_close(scores["left"], scores["right"], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(scores["right"], alone, atol=TOLERANCE, rtol=0)


def test_a_conversation_ends_at_the_end_of_turn_token(family_model: Path) -> None:
    """Score models are trained on conversations and read at their last token; a rollout's answer
    ends with the end-of-turn token, so a conversation must too (not with a template's newline)."""
    processor = AutoProcessor.from_pretrained(family_model)
    family = family_of(processor)
    ids = processor.tokenizer(render_conversation(processor, "Why?", "Because."))["input_ids"]
    assert ids[-1] in family.end_token_ids(processor.tokenizer)


@torch.no_grad()
def test_micro_batches_score_like_the_whole_batch(family_model: Path, images: list[Image.Image]) -> None:
    actor, samples, processor = sampled(family_model, images)
    family, prompt_length = family_of(processor), samples.prompt_length
    torch.manual_seed(0)
    critic = ScoreModel.from_base(family_model, "critic").eval()
    whole_logits = response_logits(actor, samples.inputs, prompt_length)
    whole_values = response_values(critic, samples.inputs, prompt_length)
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        part = family.slice_inputs(samples.inputs, rows)
        mask = samples.response_mask[rows].bool()
        logits = response_logits(actor, part, prompt_length)
        torch.testing.assert_close(logits[mask], whole_logits[rows][mask], atol=TOLERANCE, rtol=0)
        values = response_values(critic, part, prompt_length)
        torch.testing.assert_close(values[mask], whole_values[rows][mask], atol=TOLERANCE, rtol=0)


@pytest.fixture(scope="module")
def ppo_models(family_model: Path) -> PPOModels:
    processor = AutoProcessor.from_pretrained(family_model)
    for kind, seed in (("reward", 1), ("cost", 2)):
        torch.manual_seed(seed)
        ScoreModel.from_base(family_model, kind).save(family_model.parent / kind, processor=processor)
    return PPOModels.critics_from_scores(
        str(family_model), str(family_model.parent / "reward"), str(family_model.parent / "cost")
    )


def ppo_config(**overrides: Any) -> PPOStageConfig:
    train = {"epochs": 1, "per_device_batch_size": 2, "learning_rate": 1e-4, "warmup_ratio": 0.0,
             "precision": "fp32", "log_every_steps": 1}  # fmt: skip
    settings = {
        "actor": train | {"max_steps": 2},
        "critic": train,
        "generation": {"max_new_tokens": 6},
        "prompt_batch_size": 4,
        "lagrangian": {"rule": "log", "init": 1.0, "lr": 0.01, "threshold": -50.0, "update_delay_steps": 0},
    }
    return PPOStageConfig.model_validate(settings | overrides)


def both_roles(cfg: PPOStageConfig, **train: Any) -> PPOStageConfig:
    """`cfg` with the same training settings changed for the actor and the critics."""
    return cfg.model_copy(
        update={role: getattr(cfg, role).model_copy(update=train) for role in ("actor", "critic")}
    )


def weights(run: PPOLagrangianTrainer) -> dict[str, torch.Tensor]:
    return {f"{role}.{name}": param.detach().clone() for role, engine in run.roles.trained().items()
            for name, param in engine.module.named_parameters()}  # fmt: skip


def test_a_rollout_in_micro_batches_updates_like_the_whole_batch(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    """Two micro-batches with gradient accumulation make the same optimizer step as one batch of both,
    when every answer has the same length (the losses are token means per micro-batch)."""
    prompts = load_split(str(demo_data), "train").select(range(8))
    micro_cfg = both_roles(ppo_config(), gradient_accumulation_steps=2)
    whole_cfg = both_roles(micro_cfg, per_device_batch_size=4, gradient_accumulation_steps=1)
    runs = {
        name: PPOLagrangianTrainer(
            cfg,
            ppo_models,
            prompts,
            variant="safe-rlhf-v",
            checkpoint_dir=tmp_path / name,
            checkpoint_key=KEY,
        )
        for name, cfg in (("micro", micro_cfg), ("whole", whole_cfg))
    }
    before = weights(runs["whole"])
    rows = [prompts[i] for i in range(4)]
    torch.manual_seed(0)
    rollout = runs["micro"].rollout(rows)
    # Equal answer lengths, so a token mean over the batch is the mean of the micro-batches' means.
    rollout = dataclasses.replace(rollout, response_mask=torch.ones_like(rollout.response_mask))
    assert rollout.has_critic_values
    metrics = {name: run.train_step(rollout) for name, run in runs.items()}
    assert metrics["micro"] == pytest.approx(metrics["whole"], rel=1e-4, abs=1e-6)
    after = {name: weights(run) for name, run in runs.items()}
    moved = [key for key in before if not torch.equal(before[key], after["whole"][key])]
    assert {key.split(".")[0] for key in moved} == {"actor", "reward_critic", "cost_critic"}
    # Adam divides each gradient by its own RMS, so where a gradient is near zero the float
    # reassociation of two micro-batches shows up at a few percent of that element's step (lr 1e-4):
    # hold the updates to 5% of one step, which a skipped or doubled micro-batch far exceeds.
    for key in before:
        torch.testing.assert_close(after["micro"][key], after["whole"][key], rtol=1e-4, atol=5e-6, msg=key)


def test_ppo_runs_with_micro_batches_two_update_passes_and_lora(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    cfg = ppo_config(update_iters=2, actor_lora=LoraSettings(r=4, alpha=8, dropout=0.1))
    prompts = load_split(str(demo_data), "train").select(range(8))
    run = PPOLagrangianTrainer(
        cfg, ppo_models, prompts, variant="safe-rlhf-v", checkpoint_dir=tmp_path / "ckpt", checkpoint_key=KEY
    )
    assert not run.reuse_training_forward, "LoRA dropout and two passes need the rollout's own scores"
    metrics = run.train()
    assert run.step == 2 and all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    run.save_actor(tmp_path / "policy")
    policy = AutoModelForImageTextToText.from_pretrained(tmp_path / "policy", use_safetensors=True)
    assert family_of(policy.config) == family_of(AutoProcessor.from_pretrained(tmp_path / "policy"))
