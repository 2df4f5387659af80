"""Batches of BeaverTails-V preference pairs for reward and cost model training.

A batch of B paired rows becomes 2B sequences: rows ``[0, B)`` hold each pair's ``response_1``,
rows ``[B, 2B)`` its ``response_2``, so ``scores[:B]`` and ``scores[B:]`` line up pair by pair in
the losses. Both sequences of a pair see the same image.

Text goes through the processor's own chat template and the processor tokenizes it and expands
the image placeholders, so nothing here knows a model family's token ids, image-token count or
template. Truncation happens *after* the processor: the processor cannot be told which tokens may
go, and a plain ``truncation=True`` would cut image tokens (the model then fails on a mismatch
between image features and placeholders) or cut the whole answer away. Instead each sequence keeps
its full prompt and loses only the tail of its response; a prompt too long to leave room for a
meaningful response is an error rather than a silently useless training pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from transformers import BatchFeature, ProcessorMixin

from safe_rlhf_v.data.schema import RESPONSE_IDS, YES_NO

PaddingSide = Literal["left", "right"]
QUESTION_PREVIEW_CHARS = 60


@dataclass(frozen=True)
class PreferenceBatch:
    """Model inputs for 2B sequences plus the pair labels (B pairs) the losses need."""

    inputs: dict[str, torch.Tensor]
    more_helpful: torch.Tensor
    safer: torch.Tensor
    harmless_rate: torch.Tensor
    is_safe: torch.Tensor
    response_tokens: torch.Tensor
    truncated: int


def _messages(question: str, response: str | None = None) -> list[dict[str, Any]]:
    """The conversation in the content-parts form every multimodal chat template accepts."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if response is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return messages


def render_prompt(processor: ProcessorMixin, question: str) -> str:
    """The user turn (image + question) followed by the template's assistant generation prompt."""
    return processor.apply_chat_template(_messages(question), add_generation_prompt=True, tokenize=False)


def render_conversation(processor: ProcessorMixin, question: str, response: str) -> str:
    """The full exchange as the model is trained to see it, end-of-turn token included."""
    return processor.apply_chat_template(_messages(question, response), tokenize=False)


def _field(row: dict[str, Any], index: int, column: str) -> Any:
    if column not in row:
        raise ValueError(f"preference row {index} has no column {column!r} (columns: {sorted(row)})")
    return row[column]


def _choice(row: dict[str, Any], index: int, column: str, allowed: tuple[str, str]) -> int:
    """Position of the row's value in ``allowed``; labels are strings in BeaverTails-V."""
    value = _field(row, index, column)
    if value not in allowed:
        raise ValueError(f"preference row {index}: {column} must be one of {allowed}, got {value!r}")
    return allowed.index(value)


def _real_ids(encoding: BatchFeature) -> list[torch.Tensor]:
    """Each row's tokens without padding, whichever side the processor padded on."""
    return [
        ids[mask.bool()] for ids, mask in zip(encoding["input_ids"], encoding["attention_mask"], strict=True)
    ]


def _common_prefix(first: torch.Tensor, second: torch.Tensor) -> int:
    """Tokens shared at the start. Equals the prompt length when the prompt's tokens are a prefix of
    the conversation's; a tokenizer that merges across the boundary shortens it by the merged token,
    which then counts as response, so truncation still never reaches into the prompt."""
    n = min(len(first), len(second))
    differ = (first[:n] != second[:n]).nonzero()
    return int(differ[0]) if len(differ) else n


def _preview(question: str) -> str:
    """Enough of a question to find it in the data set without flooding the error message."""
    if len(question) <= QUESTION_PREVIEW_CHARS:
        return question
    return question[:QUESTION_PREVIEW_CHARS] + "..."


def _pad(rows: list[torch.Tensor], value: int, side: PaddingSide) -> torch.Tensor:
    """Stack 1-D rows into (n, longest). Written out because only recent torch releases have
    ``pad_sequence(padding_side=...)`` and the package supports torch from 2.4."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        if side == "right":
            out[i, : len(row)] = row
        else:
            out[i, width - len(row) :] = row
    return out


class PreferenceCollator:
    """Turns a list of paired BeaverTails-V rows into a :class:`PreferenceBatch`.

    ``padding_side`` defaults to right, the usual choice for training; the score model reads each
    sequence's score at its last real token, so either side gives the same scores.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        max_length: int,
        *,
        padding_side: PaddingSide = "right",
        min_response_tokens: int = 8,
    ) -> None:
        if padding_side not in get_args(PaddingSide):
            raise ValueError(f"padding_side must be one of {get_args(PaddingSide)}, got {padding_side!r}")
        if min_response_tokens < 1:
            raise ValueError(f"min_response_tokens must be at least 1, got {min_response_tokens}")
        if max_length <= min_response_tokens:
            raise ValueError(
                f"max_length ({max_length}) must exceed min_response_tokens ({min_response_tokens})"
            )
        pad_token_id = processor.tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("the processor's tokenizer has no pad token; set tokenizer.pad_token first")
        self.processor = processor
        self.max_length = max_length
        self.padding_side = padding_side
        self.min_response_tokens = min_response_tokens
        self.pad_token_id: int = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> PreferenceBatch:
        if not rows:
            raise ValueError("cannot collate an empty list of preference rows")
        questions = [_field(row, i, "question") for i, row in enumerate(rows)]
        images = [_field(row, i, "image") for i, row in enumerate(rows)]
        conversations = [
            render_conversation(self.processor, question, _field(row, i, f"response_{rid}"))
            for rid in RESPONSE_IDS
            for i, (row, question) in enumerate(zip(rows, questions, strict=True))
        ]
        prompts = self.processor(
            images=images,
            text=[render_prompt(self.processor, q) for q in questions],
            padding=True,
            return_tensors="pt",
        )
        encoding = self.processor(
            images=images * len(RESPONSE_IDS), text=conversations, padding=True, return_tensors="pt"
        )
        inputs, response_tokens, truncated = self._truncate_and_pad(
            encoding, _real_ids(prompts) * len(RESPONSE_IDS), questions * len(RESPONSE_IDS)
        )
        return PreferenceBatch(
            inputs=inputs,
            response_tokens=response_tokens,
            truncated=truncated,
            **self._labels(rows),
        )

    def _keep_lengths(
        self, full: list[torch.Tensor], prompts: list[torch.Tensor], questions: list[str]
    ) -> tuple[list[int], list[int]]:
        """Tokens kept per sequence and how many of them are response tokens."""
        keep, response = [], []
        for ids, prompt_ids, question in zip(full, prompts, questions, strict=True):
            prompt_len = _common_prefix(prompt_ids, ids)
            room = self.max_length - prompt_len
            if len(ids) > self.max_length and room < self.min_response_tokens:
                raise ValueError(
                    f"question {_preview(question)!r}: its prompt takes {prompt_len} tokens of max_length "
                    f"{self.max_length}, leaving {room} for the response (min_response_tokens="
                    f"{self.min_response_tokens}); raise max_length or use smaller images"
                )
            kept = min(len(ids), self.max_length)
            keep.append(kept)
            response.append(kept - prompt_len)
        return keep, response

    def _truncate_and_pad(
        self, encoding: BatchFeature, prompts: list[torch.Tensor], questions: list[str]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """Cut response tails to ``max_length`` and re-pad every per-token tensor the processor
        returned (ids, mask, and e.g. token type ids); image tensors pass through untouched."""
        real = encoding["attention_mask"].bool()
        full = _real_ids(encoding)
        keep, response = self._keep_lengths(full, prompts, questions)
        inputs: dict[str, torch.Tensor] = {}
        for key, value in encoding.items():
            if isinstance(value, torch.Tensor) and value.shape == real.shape:
                pad_value = self.pad_token_id if key == "input_ids" else 0
                kept_rows = [row[mask][:n] for row, mask, n in zip(value, real, keep, strict=True)]
                inputs[key] = _pad(kept_rows, pad_value, self.padding_side)
            else:
                inputs[key] = value
        truncated = sum(n < len(ids) for n, ids in zip(keep, full, strict=True))
        return inputs, torch.tensor(response, dtype=torch.long), truncated

    @staticmethod
    def _labels(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pair labels as indices into (response_1, response_2)."""
        more_helpful, safer, rates, safe = [], [], [], []
        for i, row in enumerate(rows):
            more_helpful.append(_choice(row, i, "more_helpful_response_id", RESPONSE_IDS))
            safer.append(_choice(row, i, "safer_response_id", RESPONSE_IDS))
            rates.append([int(_field(row, i, f"response_{rid}_harmless_rate")) for rid in RESPONSE_IDS])
            safe.append([_choice(row, i, f"is_response_{rid}_safe", YES_NO) == 0 for rid in RESPONSE_IDS])
        return {
            "more_helpful": torch.tensor(more_helpful, dtype=torch.long),
            "safer": torch.tensor(safer, dtype=torch.long),
            "harmless_rate": torch.tensor(rates, dtype=torch.long),
            "is_safe": torch.tensor(safe, dtype=torch.bool),
        }
