"""Beaver-Guard-V as the guardrail's judge: a saved guard folder answering batches of requests.

`GuardJudge` implements `safe_rlhf_v.guardrail.Judge`: requests (image + question) are judged by
the query head on the prompt alone, answers by the rating and category heads on the whole
conversation, exactly as the guard was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import ProcessorMixin

from safe_rlhf_v.data.collate import encode_conversations, render_prompt
from safe_rlhf_v.guardrail import AnswerVerdict, QueryVerdict
from safe_rlhf_v.models.guard import GuardModel, query_severities, query_unsafe_probability
from safe_rlhf_v.models.inference import best_device, inference_dtype, model_inputs
from safe_rlhf_v.models.loading import load_processor


class GuardJudge:
    """A loaded guard plus its processor, evaluated in batches without gradients, on the GPU when
    there is one, in the device's inference precision (`models.inference`)."""

    def __init__(
        self,
        guard_dir: str | Path,
        *,
        batch_size: int = 16,
        max_length: int = 2048,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.device = torch.device(device or best_device())
        self.dtype = dtype or inference_dtype(self.device)
        self.guard = GuardModel.load(Path(guard_dir), dtype=self.dtype).to(self.device).eval()
        self.processor: ProcessorMixin = load_processor(guard_dir)
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def judge_queries(self, images: list[Image.Image], questions: list[str]) -> list[QueryVerdict]:
        verdicts: list[QueryVerdict] = []
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            encoded = self.processor(
                images=images[chunk],
                text=[render_prompt(self.processor, q) for q in questions[chunk]],
                padding=True,
                return_tensors="pt",
            )
            logits = self.guard(**model_inputs(encoded, self.device, self.dtype)).query_logits
            for severity, score in zip(
                query_severities(logits), query_unsafe_probability(logits).tolist(), strict=True
            ):
                verdicts.append(
                    QueryVerdict(safe=severity == "safe", severity=severity, unsafe_probability=score)
                )
        return verdicts

    @torch.no_grad()
    def judge_answers(
        self, images: list[Image.Image], questions: list[str], answers: list[str]
    ) -> list[AnswerVerdict]:
        verdicts: list[AnswerVerdict] = []
        for start in range(0, len(questions), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            encoded = encode_conversations(
                self.processor,
                images[chunk],
                questions[chunk],
                [answer or " " for answer in answers[chunk]],  # an empty answer still gets judged
                max_length=self.max_length,
                min_response_tokens=1,
            )
            output = self.guard(**model_inputs(encoded.inputs, self.device, self.dtype))
            verdicts += [
                AnswerVerdict(safe=v.safe, severity=v.severity, rating=v.rating, category=v.category)
                for v in self.guard.verdicts(output)
            ]
        return verdicts
