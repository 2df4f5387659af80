"""What differs between vision-language model families, in one place.

Everything else in the package (rollouts, collation, scoring, slicing, generation) goes through a
:class:`ModelFamily` and assumes nothing about a family's pixel layout, positions, token ids or
padding side. What differs:

- **Image tensors.** LLaVA-1.5 gives ``pixel_values`` with one row per sequence; LLaVA-NeXT one row
  per sequence too, of any-resolution patches, plus ``image_sizes``; Qwen2-VL and Qwen2.5-VL stack
  every image's patches into one ``(total patches, dim)`` tensor with one ``image_grid_thw`` row per
  image. Taking rows of a batch (PPO micro-batches) must follow that layout.
- **Positions.** LLaVA's language models use 1-D RoPE: ``generate`` counts positions over real
  tokens, and a forward pass over a left-padded rollout must count them the same way. Qwen2-VL's
  M-RoPE gives image tokens 3-D (time, height, width) positions that the model computes itself from
  ``mm_token_type_ids`` and ``image_grid_thw``, but only when no ``position_ids`` are passed.
- **Token-aligned processor outputs** (``mm_token_type_ids``) cover the prompt and must be extended
  over the answer, as text.
- **End-of-turn tokens.** An answer ends at the family's end of turn (``</s>`` for LLaVA-1.5,
  ``<|im_end|>`` for Qwen), and some templates write text after it (Qwen's ``"\\n"``) that the model
  never generates; a conversation is cut there, so score models are trained to read their score
  exactly where a rollout's answer ends.
- **Module names** of the vision tower and projector, for freezing them.

A family is looked up from a model config (``config.model_type``) or from a processor (its class).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from transformers import PretrainedConfig, ProcessorMixin

from safe_rlhf_v.errors import UserError


class UnsupportedFamily(UserError, ValueError):
    """A model whose architecture is none of the supported VLM families (the message lists them)."""


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions counted over real tokens only, as ``generate`` counts them for left-padded prompts."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


@dataclass(frozen=True)
class ModelFamily:
    """One VLM family's conventions; see the module docstring for what each field decides.

    ``mrope``: the model computes its own (multi-axis) positions from the token-type ids, so none are
    passed. ``image_grid_key``: the processor output with one row per image whose product of entries
    counts that image's rows in a stacked ``pixel_values`` (None: image tensors have one row per
    sequence). ``end_of_turn``: token strings that end an assistant turn besides the tokenizer's eos.
    """

    name: str
    model_types: tuple[str, ...]
    processor_classes: tuple[str, ...]
    vision_tower: tuple[str, ...]
    projector: tuple[str, ...]
    mrope: bool = False
    image_grid_key: str | None = None
    end_of_turn: tuple[str, ...] = ()

    # --- tokens -------------------------------------------------------------------------------
    def end_token_ids(self, tokenizer: Any) -> list[int]:
        """Every token id that ends an answer: the tokenizer's eos and the family's end-of-turn tokens
        present in the vocabulary (Qwen's tokenizer knows both ``<|im_end|>`` and ``<|endoftext|>``)."""
        vocab = tokenizer.get_vocab()
        ids = {vocab[token] for token in self.end_of_turn if token in vocab}
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        if not ids:
            raise ValueError(f"the {self.name} tokenizer has no eos token and none of {self.end_of_turn}")
        return sorted(ids)

    def suppressed_token_ids(self, tokenizer: Any) -> list[int]:
        """Special tokens an answer must never contain: all but the end tokens. A sampled image token,
        say, would make the model expect image features that do not exist."""
        return sorted(set(tokenizer.all_special_ids) - set(self.end_token_ids(tokenizer)))

    def cut_after_end_of_turn(self, tokenizer: Any, conversation: str) -> str:
        """A rendered conversation up to and including its last end token: whatever a template writes
        after the end of the answer (Qwen's newline) is never generated, so no model sees it."""
        ends = [tokenizer.convert_ids_to_tokens(i) for i in self.end_token_ids(tokenizer)]
        cut = max((conversation.rfind(end) + len(end) for end in ends if end in conversation), default=-1)
        return conversation if cut < 0 else conversation[:cut]

    # --- sequences ------------------------------------------------------------------------------
    def sequence_inputs(
        self, prompt: Mapping[str, torch.Tensor], answers: torch.Tensor, answer_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Model inputs for ``[left-padded prompt | answer]`` from the processor's prompt inputs.

        Token-aligned prompt tensors are extended over the answer as text (0); image tensors pass
        through; positions are the ones ``generate`` used (1-D families) or left to the model (M-RoPE).
        """
        prompt_mask = prompt["attention_mask"]
        attention = torch.cat([prompt_mask, answer_mask.to(prompt_mask.dtype)], dim=1)
        inputs: dict[str, torch.Tensor] = {}
        for key, value in prompt.items():
            if key == "input_ids":
                inputs[key] = torch.cat([value, answers.to(value.dtype)], dim=1)
            elif key == "attention_mask":
                inputs[key] = attention
            elif value.dim() == 2 and value.shape == prompt_mask.shape:
                inputs[key] = torch.cat([value, value.new_zeros(answers.shape)], dim=1)
            else:
                inputs[key] = value
        if not self.mrope:
            inputs["position_ids"] = text_positions(attention)
        return inputs

    def slice_inputs(self, inputs: Mapping[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
        """The model inputs of sequences ``rows`` of a batch, image tensors included."""
        batch = inputs["input_ids"].shape[0]
        start, stop, step = rows.indices(batch)
        if step != 1:
            raise ValueError(f"micro-batches are contiguous row ranges, got step {step}")
        out: dict[str, torch.Tensor] = {}
        images = self._image_rows(inputs, start, stop) if self.image_grid_key else None
        for key, value in inputs.items():
            if images is not None and key == self.image_grid_key:
                out[key] = value[images[0] : images[1]]
            elif images is not None and key == "pixel_values":
                patches = inputs[self.image_grid_key].prod(dim=1)  # type: ignore[index]
                offsets = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
                out[key] = value[int(offsets[images[0]]) : int(offsets[images[1]])]
            else:
                if value.shape[0] != batch:
                    raise ValueError(
                        f"{self.name}: cannot take rows of {key} {tuple(value.shape)}: it has no row per "
                        f"sequence of the batch of {batch}"
                    )
                out[key] = value[start:stop]
        return out

    def _image_rows(self, inputs: Mapping[str, torch.Tensor], start: int, stop: int) -> tuple[int, int]:
        """[first, last) image of sequences start..stop: images are stacked in sequence order, and a
        sequence holds as many images as runs of image tokens in its token types."""
        kinds = inputs["mm_token_type_ids"] * inputs["attention_mask"]
        is_image = (kinds == 1).long()
        runs = (is_image[:, 1:] > is_image[:, :-1]).sum(dim=1) + is_image[:, 0]
        offsets = torch.cat([runs.new_zeros(1), runs.cumsum(0)])
        total = int(offsets[-1])
        grid = inputs[self.image_grid_key]  # type: ignore[index]
        if total != grid.shape[0]:
            raise ValueError(
                f"{self.name}: the batch's token types show {total} images but {self.image_grid_key} has "
                f"{grid.shape[0]} rows"
            )
        return int(offsets[start]), int(offsets[stop])


_LLAVA_TOWER = ("vision_tower",)
_LLAVA_PROJECTOR = ("multi_modal_projector",)
# Qwen's projector (the patch merger) sits inside its vision tower.
_QWEN = {
    "vision_tower": ("visual",),
    "projector": ("visual.merger",),
    "mrope": True,
    "image_grid_key": "image_grid_thw",
    "end_of_turn": ("<|im_end|>", "<|endoftext|>"),
}

FAMILIES: Mapping[str, ModelFamily] = MappingProxyType(
    {
        "llava": ModelFamily("llava", ("llava",), ("LlavaProcessor",), _LLAVA_TOWER, _LLAVA_PROJECTOR),
        "llava_next": ModelFamily(
            "llava_next", ("llava_next",), ("LlavaNextProcessor",), _LLAVA_TOWER, _LLAVA_PROJECTOR
        ),
        "qwen2_vl": ModelFamily("qwen2_vl", ("qwen2_vl",), ("Qwen2VLProcessor",), **_QWEN),
        "qwen2_5_vl": ModelFamily("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLProcessor",), **_QWEN),
    }
)


def family_of(source: PretrainedConfig | ProcessorMixin | torch.nn.Module) -> ModelFamily:
    """The family of a model config, a model (its config) or a processor (its class)."""
    if isinstance(source, ProcessorMixin):
        name = type(source).__name__
        found = [f for f in FAMILIES.values() if name in f.processor_classes]
        what = f"processor class {name}"
    else:
        config = source if isinstance(source, PretrainedConfig) else getattr(source, "config", None)
        model_type = getattr(config, "model_type", None)
        found = [f for f in FAMILIES.values() if model_type in f.model_types]
        what = f"model type {model_type!r}"
    if not found:
        raise UnsupportedFamily(f"unsupported model family: {what}; supported families: {sorted(FAMILIES)}")
    return found[0]
