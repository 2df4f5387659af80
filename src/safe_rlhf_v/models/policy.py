"""The policy as a text generator: (image, question) batches in, answers out.

Used wherever answers are produced outside PPO's rollout (the guardrail, evaluation, the demo
check): left-padded prompts through the processor's chat template, sampling or greedy decoding
with the KV cache, and only the newly generated tokens decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, ProcessorMixin

from safe_rlhf_v.config import GenerationConfig
from safe_rlhf_v.data.collate import render_prompt
from safe_rlhf_v.models.family import family_of
from safe_rlhf_v.models.inference import best_device, inference_dtype, model_inputs
from safe_rlhf_v.models.loading import load_model, load_processor


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding knobs; `temperature == 0` means greedy."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int | None = 0

    @classmethod
    def from_config(
        cls, gen: GenerationConfig, *, batch_size: int, seed: int | None = 0
    ) -> GenerationSettings:
        """The decoding knobs of a config's `generation` section plus the caller's batch size."""
        return cls(
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            batch_size=batch_size,
            seed=seed,
        )


class Policy:
    """A Hugging Face image-text-to-text model and its processor, ready to answer questions.

    `device` defaults to the GPU when there is one, `dtype` to the device's inference precision
    (`models.inference`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        settings: GenerationSettings | None = None,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.settings = settings or GenerationSettings()
        self.device = torch.device(device or best_device())
        self.dtype = dtype or inference_dtype(self.device)
        self.processor: ProcessorMixin = load_processor(model_dir, trust_remote_code=trust_remote_code)
        self.model = load_model(
            AutoModelForImageTextToText, model_dir, dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()

    @torch.no_grad()
    def generate(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        """One answer per (image, question), in order."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions")
        if self.settings.seed is not None:
            torch.manual_seed(self.settings.seed)
        answers: list[str] = []
        step = self.settings.batch_size
        for start in range(0, len(questions), step):
            answers += self._generate_batch(images[start : start + step], questions[start : start + step])
        return answers

    def _generate_batch(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        prompts = [render_prompt(self.processor, question) for question in questions]
        encoded = self.processor(
            images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt"
        )
        inputs = model_inputs(encoded, self.device, self.dtype)
        sampling = self.settings.temperature > 0
        tokenizer, family = self.processor.tokenizer, family_of(self.processor)
        output = self.model.generate(
            **inputs,
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=sampling,
            temperature=self.settings.temperature if sampling else None,
            top_p=self.settings.top_p if sampling else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=family.end_token_ids(tokenizer),
            suppress_tokens=family.suppressed_token_ids(tokenizer),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
