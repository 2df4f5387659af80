"""Batches of BeaverTails-V conversations: preference pairs (reward and cost models) and single
(image, question, response) rows for supervised fine-tuning of the policy.

A preference batch of B paired rows becomes 2B sequences: rows ``[0, B)`` hold each pair's
``response_1``, rows ``[B, 2B)`` its ``response_2``, so ``scores[:B]`` and ``scores[B:]`` line up
pair by pair in the losses. Both sequences of a pair see the same image.

Text goes through the processor's own chat template and the processor tokenizes it and expands
the image tokens, so nothing here knows a model family's token ids, image-token count or
template. Truncation happens *after* the processor: the processor cannot be told which tokens may
go, and a plain ``truncation=True`` would cut image tokens (the model then fails on a mismatch
between image features and image tokens) or cut the whole answer away. Instead each sequence keeps
its full prompt and loses only the tail of its response; a prompt too long to leave room for a
meaningful response is an error rather than a silently useless training pair. Every collator goes
through :func:`encode_conversations`, so they all tokenize and truncate identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from transformers import BatchFeature, ProcessorMixin

from safe_rlhf_v.data.schema import RESPONSE_IDS, YES_NO
from safe_rlhf_v.models.family import family_of

PaddingSide = Literal["left", "right"]
QUESTION_PREVIEW_CHARS = 60
IGNORE_INDEX = -100
"""Label of tokens that are no target: the value PyTorch's and Hugging Face's cross-entropy skip."""


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
    """The full exchange as the model is trained to see it, ending at its end-of-turn token: text a
    template writes after it (Qwen's newline) is never generated, so a score read at the last token
    of a training pair is read where a sampled answer ends."""
    rendered = processor.apply_chat_template(_messages(question, response), tokenize=False)
    return family_of(processor).cut_after_end_of_turn(processor.tokenizer, rendered)


def _field(row: dict[str, Any], index: int, column: str, kind: str = "preference") -> Any:
    if column not in row:
        raise ValueError(f"{kind} row {index} has no column {column!r} (columns: {sorted(row)})")
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


@dataclass(frozen=True)
class EncodedConversations:
    """N tokenized (image, question, response) sequences, each cut to ``max_length`` at its response tail."""

    inputs: dict[str, torch.Tensor]
    response_tokens: torch.Tensor  # (N,) long: tokens of each kept sequence that belong to the response
    truncated: int  # sequences that lost part of their response


def _checked_pad_token_id(
    processor: ProcessorMixin, max_length: int, min_response_tokens: int, padding_side: str
) -> int:
    """Validate the encoding settings; returns the pad token id every padded tensor needs."""
    if padding_side not in get_args(PaddingSide):
        raise ValueError(f"padding_side must be one of {get_args(PaddingSide)}, got {padding_side!r}")
    if min_response_tokens < 1:
        raise ValueError(f"min_response_tokens must be at least 1, got {min_response_tokens}")
    if max_length <= min_response_tokens:
        raise ValueError(f"max_length ({max_length}) must exceed min_response_tokens ({min_response_tokens})")
    pad_token_id = processor.tokenizer.pad_token_id
    if pad_token_id is None:
        raise ValueError("the processor's tokenizer has no pad token; set tokenizer.pad_token first")
    return int(pad_token_id)


def _keep_lengths(
    full: list[torch.Tensor],
    prompts: list[torch.Tensor],
    questions: list[str],
    max_length: int,
    min_response_tokens: int,
) -> tuple[list[int], list[int]]:
    """Tokens kept per sequence and how many of them are response tokens."""
    keep, response = [], []
    for ids, prompt_ids, question in zip(full, prompts, questions, strict=True):
        prompt_len = _common_prefix(prompt_ids, ids)
        room = max_length - prompt_len
        if len(ids) > max_length and room < min_response_tokens:
            raise ValueError(
                f"question {_preview(question)!r}: its prompt takes {prompt_len} tokens of max_length "
                f"{max_length}, leaving {room} for the response (min_response_tokens="
                f"{min_response_tokens}); raise max_length or use smaller images"
            )
        kept = min(len(ids), max_length)
        keep.append(kept)
        response.append(kept - prompt_len)
    return keep, response


def encode_conversations(
    processor: ProcessorMixin,
    images: list[Any],
    questions: list[str],
    responses: list[str],
    *,
    max_length: int,
    min_response_tokens: int = 8,
    padding_side: PaddingSide = "right",
) -> EncodedConversations:
    """Tokenize sequence i = (images[i], questions[i], responses[i]) through the chat template, cut
    each response tail to fit ``max_length`` and re-pad every per-token tensor the processor
    returned; image tensors pass through untouched.

    The prompt length comes from encoding the prompt alone (image included) and comparing it with
    the full conversation, so the image-token expansion of any processor is accounted for.
    """
    pad_token_id = _checked_pad_token_id(processor, max_length, min_response_tokens, padding_side)
    if not len(images) == len(questions) == len(responses):
        raise ValueError(
            f"images ({len(images)}), questions ({len(questions)}) and responses ({len(responses)}) "
            "must have the same length"
        )
    if not questions:
        raise ValueError("cannot encode an empty list of conversations")
    prompts = processor(
        images=images,
        text=[render_prompt(processor, question) for question in questions],
        padding=True,
        return_tensors="pt",
    )
    encoding = processor(
        images=images,
        text=[render_conversation(processor, q, r) for q, r in zip(questions, responses, strict=True)],
        padding=True,
        return_tensors="pt",
    )
    full = _real_ids(encoding)
    keep, response = _keep_lengths(full, _real_ids(prompts), questions, max_length, min_response_tokens)
    return EncodedConversations(
        inputs=_cut_and_pad(encoding, keep, pad_token_id, padding_side),
        response_tokens=torch.tensor(response, dtype=torch.long),
        truncated=sum(n < len(ids) for n, ids in zip(keep, full, strict=True)),
    )


def _cut_and_pad(
    encoding: BatchFeature, keep: list[int], pad_token_id: int, padding_side: PaddingSide
) -> dict[str, torch.Tensor]:
    """Keep the first ``keep[i]`` real tokens of row i in every per-token tensor and re-pad them;
    other tensors (pixel values, image sizes) pass through."""
    real = encoding["attention_mask"].bool()
    inputs: dict[str, torch.Tensor] = {}
    for key, value in encoding.items():
        if isinstance(value, torch.Tensor) and value.shape == real.shape:
            pad_value = pad_token_id if key == "input_ids" else 0
            kept_rows = [row[mask][:n] for row, mask, n in zip(value, real, keep, strict=True)]
            inputs[key] = _pad(kept_rows, pad_value, padding_side)
        else:
            inputs[key] = value
    return inputs


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
        _checked_pad_token_id(processor, max_length, min_response_tokens, padding_side)
        self.processor = processor
        self.max_length = max_length
        self.padding_side = padding_side
        self.min_response_tokens = min_response_tokens

    def __call__(self, rows: list[dict[str, Any]]) -> PreferenceBatch:
        if not rows:
            raise ValueError("cannot collate an empty list of preference rows")
        questions = [_field(row, i, "question") for i, row in enumerate(rows)]
        images = [_field(row, i, "image") for i, row in enumerate(rows)]
        responses = [_field(row, i, f"response_{rid}") for rid in RESPONSE_IDS for i, row in enumerate(rows)]
        encoded = encode_conversations(
            self.processor,
            images * len(RESPONSE_IDS),
            questions * len(RESPONSE_IDS),
            responses,
            max_length=self.max_length,
            min_response_tokens=self.min_response_tokens,
            padding_side=self.padding_side,
        )
        return PreferenceBatch(
            inputs=encoded.inputs,
            response_tokens=encoded.response_tokens,
            truncated=encoded.truncated,
            **self._labels(rows),
        )

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


class SupervisedCollator:
    """Turns ``{"image", "question", "response"}`` rows into right-padded model inputs plus ``labels``
    for next-token training of a policy.

    ``labels`` equal ``input_ids`` on the response tokens (the template's final eos included: the
    policy must learn to stop) and are ``IGNORE_INDEX`` on the prompt (the model is not taught to
    write questions or image tokens) and on padding. Hugging Face causal LMs shift labels
    themselves, so ``labels[t]`` is the target of the logits at ``t - 1``.
    """

    def __init__(self, processor: ProcessorMixin, max_length: int, *, min_response_tokens: int = 8) -> None:
        _checked_pad_token_id(processor, max_length, min_response_tokens, "right")
        self.processor = processor
        self.max_length = max_length
        self.min_response_tokens = min_response_tokens

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty list of supervised rows")
        columns = {
            column: [_field(row, i, column, "supervised") for i, row in enumerate(rows)]
            for column in ("image", "question", "response")
        }
        encoded = encode_conversations(
            self.processor,
            columns["image"],
            columns["question"],
            columns["response"],
            max_length=self.max_length,
            min_response_tokens=self.min_response_tokens,
            padding_side="right",
        )
        ids, mask = encoded.inputs["input_ids"], encoded.inputs["attention_mask"]
        lengths = mask.sum(dim=1, keepdim=True)
        position = torch.arange(ids.shape[1]).unsqueeze(0)
        is_target = (position >= lengths - encoded.response_tokens.unsqueeze(1)) & (position < lengths)
        return encoded.inputs | {"labels": ids.masked_fill(~is_target, IGNORE_INDEX)}


@dataclass(frozen=True)
class GuardBatch:
    """B rows seen twice by the guard: as full conversations (its rating and category heads judge the
    answer) and as prompts alone, image + question + generation prompt (its query head judges the
    request before any answer exists). ``labels`` holds one (B,) long tensor per label column."""

    conversations: dict[str, torch.Tensor]
    prompts: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    truncated: int


class GuardCollator:
    """Turns ``{"image", "question", "response", *label_columns}`` rows into a :class:`GuardBatch`.

    Conversations go through :func:`encode_conversations` (response tails cut to ``max_length``).
    Prompts are never cut and need no check of their own: a prompt that does not fit makes its
    conversation fail in :func:`encode_conversations` first. Label columns hold integers (class
    indices) that the trainer derived; the collator only stacks them.
    """

    def __init__(
        self,
        processor: ProcessorMixin,
        max_length: int,
        *,
        label_columns: tuple[str, ...],
        padding_side: PaddingSide = "right",
        min_response_tokens: int = 8,
    ) -> None:
        _checked_pad_token_id(processor, max_length, min_response_tokens, padding_side)
        self.processor = processor
        self.max_length = max_length
        self.label_columns = label_columns
        self.padding_side: PaddingSide = padding_side
        self.min_response_tokens = min_response_tokens

    def __call__(self, rows: list[dict[str, Any]]) -> GuardBatch:
        if not rows:
            raise ValueError("cannot collate an empty list of guard rows")
        columns = {
            column: [_field(row, i, column, "guard") for i, row in enumerate(rows)]
            for column in ("image", "question", "response", *self.label_columns)
        }
        encoded = encode_conversations(
            self.processor,
            columns["image"],
            columns["question"],
            columns["response"],
            max_length=self.max_length,
            min_response_tokens=self.min_response_tokens,
            padding_side=self.padding_side,
        )
        prompts = self.processor(
            images=columns["image"],
            text=[render_prompt(self.processor, question) for question in columns["question"]],
            padding=True,
            padding_side=self.padding_side,
            return_tensors="pt",
        )
        return GuardBatch(
            conversations=encoded.inputs,
            prompts=dict(prompts),
            labels={column: self._label(column, columns[column]) for column in self.label_columns},
            truncated=encoded.truncated,
        )

    @staticmethod
    def _label(column: str, values: list[Any]) -> torch.Tensor:
        for i, value in enumerate(values):
            if not isinstance(value, int):  # bool is an int: a yes/no label is class 0 or 1
                raise ValueError(f"guard row {i}: label column {column!r} must hold integers, got {value!r}")
        return torch.tensor(values, dtype=torch.long)
