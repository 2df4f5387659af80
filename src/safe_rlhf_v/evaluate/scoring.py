"""Answers as the evaluation sees them: sampled by a policy, scored by a reward or cost model.

Evaluation scores decoded text, re-encoded through the chat template, exactly as the preference
models were trained and as any external judge sees it; PPO's in-loop scores come from the sampled
token ids instead, so the two can differ by tokenisation round trips (rarely, and only slightly).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import ProcessorMixin

from safe_rlhf_v.data.collate import encode_conversations
from safe_rlhf_v.models.inference import best_device, inference_dtype, model_inputs
from safe_rlhf_v.models.loading import load_processor
from safe_rlhf_v.models.score import ScoreModel


class AnswerScorer:
    """A saved reward or cost model scoring (image, question, answer) triples in batches."""

    def __init__(
        self, model_dir: str | Path, *, batch_size: int, max_length: int, device: str | None = None
    ) -> None:
        self.device = device or best_device()
        self.model = ScoreModel.load(model_dir, dtype=inference_dtype(self.device)).to(self.device).eval()
        self.processor: ProcessorMixin = load_processor(model_dir)
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def kind(self) -> str:
        return self.model.kind

    @torch.no_grad()
    def score(self, images: list[Image.Image], questions: list[str], answers: list[str]) -> list[float]:
        """The end score of each conversation (an empty answer is scored as one space)."""
        if not len(images) == len(questions) == len(answers):
            raise ValueError(
                f"got {len(images)} images, {len(questions)} questions and {len(answers)} answers"
            )
        scores: list[float] = []
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            encoded = encode_conversations(
                self.processor,
                images[chunk],
                questions[chunk],
                [answer or " " for answer in answers[chunk]],
                max_length=self.max_length,
                min_response_tokens=1,
            )
            inputs = model_inputs(encoded.inputs, self.device, self.model.score_head.weight.dtype)
            scores += self.model(**inputs).end_scores.float().cpu().tolist()
        return scores
