"""Tiny vision-language models built locally, for tests and the CPU demo.

The pipeline must run end to end on a laptop without hub access, so the demo policy, reward, cost
and guard models all start from a model built here: a byte-level BPE tokenizer trained on the
synthetic corpus, a real Hugging Face processor with a chat template, and a randomly initialised
few-layer model. The output directory is an ordinary Hugging Face checkpoint, so the rest of the
code loads it exactly as it loads LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or Qwen2.5-VL from the hub:

- ``AutoProcessor.from_pretrained(dir)``: tokenizer + image processor + chat template;
- ``AutoModelForImageTextToText.from_pretrained(dir)``: the generative policy;
- ``AutoModel.from_pretrained(dir)``: the base model (no LM head) that score heads sit on.

Families. ``FAMILIES`` maps a family name to a :data:`FamilyBuilder`, a function that trains the
family's tokenizer (its own special tokens, see :class:`SpecialTokens`) on the corpus and returns
the processor, the model config and the generation config; everything else (seeding, weight
initialisation, atomic saving) is shared in :func:`build_tiny_vlm`. Each family mirrors its hub
counterpart in what the rest of the pipeline can observe, at toy sizes:

- ``"llava"`` (LLaVA-1.5): every image is resized to one square, so it always yields the same
  number of image tokens;
- ``"llava_next"`` (LLaVA-1.6): any-resolution tiling, so ``pixel_values`` is 5-D
  (image, tile, channel, height, width), the processor returns ``image_sizes``, and the image-token
  count depends on the input size;
- ``"qwen2_vl"`` and ``"qwen2_5_vl"``: native resolution within a pixel budget, flattened patches
  with ``image_grid_thw``, 3-D (M-RoPE) positions, ChatML conversations ending in ``<|im_end|>``.

The Qwen processors require a video processor, which requires torchvision; torchvision is a
dependency, so those families build everywhere the package installs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen2VLTextConfig,
    Qwen2VLVideoProcessor,
    Qwen2VLVisionConfig,
)

from safe_rlhf_v.errors import ArgumentError, OutputNotEmpty


@dataclass(frozen=True)
class SpecialTokens:
    """A family's special tokens and which of them play the BOS / EOS / PAD roles.

    ``tokens`` is in trainer order, which fixes their ids (0, 1, ...): no code may rely on the
    ids, they are just stable for a corpus. ``named`` maps the tokenizer attributes that the
    processors read (``tokenizer.image_token``...) to their tokens. ``bos=None`` means the
    tokenizer adds nothing around a text, as Qwen's does.
    """

    tokens: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None
    named: Mapping[str, str]

    def __post_init__(self) -> None:
        """A role or named token outside ``tokens`` would be split into bytes instead of one id."""
        roles = [self.eos, self.pad, *([self.bos] if self.bos else []), *self.named.values()]
        missing = [token for token in roles if token not in self.tokens]
        if missing:
            raise ValueError(f"special tokens {missing} are not among {self.tokens}")


BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
LLAVA_TOKENS = SpecialTokens(
    tokens=(PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN),
    eos=EOS_TOKEN,
    pad=PAD_TOKEN,
    bos=BOS_TOKEN,
    named=MappingProxyType({"image_token": IMAGE_TOKEN}),
)
# Qwen2-VL's tokens in the order of their ids in the real vocabulary (151643...). As there, the
# eos is the end of a turn and padding uses the end-of-text token, so masking padding never hides
# the <|im_end|> a model must learn to emit.
QWEN_TOKENS = SpecialTokens(
    tokens=(
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ),
    eos="<|im_end|>",
    pad="<|endoftext|>",
    bos=None,
    named=MappingProxyType({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
)
# A byte-level BPE starts from all 256 byte symbols; it needs them plus the special tokens. This is
# the bound for the family with the fewest special tokens; a family needing more checks its own.
MIN_VOCAB_SIZE = 256 + len(LLAVA_TOKENS.tokens)

# LLaVA-1.5's conversation format ("USER: <image>\nQ ASSISTANT: A</s>"), written for both content
# forms: a plain string, or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
# Images come before the text of their turn, as in LLaVA-1.5 training. The assistant answer,
# with its leading space and the eos token, sits in a generation block: that is exactly what the
# model produces after the "ASSISTANT:" generation prompt, so `return_assistant_tokens_mask=True`
# masks the tokens a policy is trained on, and the eos teaches the model to stop. The BOS token
# is not in the template: the tokenizer adds it, as LLaVA's does, so the prompt gets exactly one
# BOS whether it is tokenized by `apply_chat_template(tokenize=True)` or by `processor(text=...)`.
# LLaVA-NeXT (LLaVA-1.6 Vicuna) was trained on the same Vicuna-v1 conversation format.
LLAVA_CHAT_TEMPLATE = r"""
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {{- content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro images_of(content) -%}
    {%- if content is not string -%}
        {%- for part in content if part['type'] == 'image' -%}
            {{- '<image>\n' -}}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}
        {{- text_of(message['content']) ~ ' ' -}}
    {%- elif message['role'] == 'user' -%}
        {{- 'USER: ' ~ images_of(message['content']) ~ text_of(message['content']) ~ ' ' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- 'ASSISTANT:' -}}
        {%- generation -%}
            {{- ' ' ~ text_of(message['content']) ~ eos_token -}}
        {%- endgeneration -%}
    {%- else -%}
        {{- raise_exception('chat message role must be system, user or assistant, got ' ~ message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""

# Qwen2-VL-Instruct's ChatML format, "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q
# <|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n", for both content forms; parts render in their
# given order, as in the real template. Unlike the real one it adds no default system prompt, which
# would only lengthen every tiny sequence. The generation block holds what the model produces
# after the "<|im_start|>assistant\n" generation prompt: the answer and <|im_end|> (its eos). The
# "\n" the real template writes after every <|im_end|> stays outside the block: a model that
# stops at its eos never produces it, so it is no training target.
QWEN_CHAT_TEMPLATE = r"""
{%- macro render(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'image' -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
    {%- if message['role'] == 'system' or message['role'] == 'user' -%}
        {{- '<|im_start|>' ~ message['role'] ~ '\n' ~ render(message['content']) ~ '<|im_end|>\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}
            {{- render(message['content']) ~ '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- else -%}
        {{- raise_exception('chat message role must be system, user or assistant, got ' ~ message['role']) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of a tiny VLM; the defaults keep one PPO step near a second on two CPU cores.

    ``image_size`` is the side of the square the vision tower is built around: LLaVA resizes every
    image to it; LLaVA-NeXT uses it as its tile and base-view size and tiles an image onto a grid
    of up to 2 x 2 tiles; Qwen2-VL resizes an image, keeping its aspect ratio, to between
    ``image_size**2`` and ``(2 * image_size)**2`` pixels. ``vocab_size`` is the target of
    tokenizer training: a small corpus may yield fewer merges, and the model's embedding table is
    sized to the tokenizer actually trained.
    """

    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_ffn: int = 128
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 344
    vocab_size: int = 1024
    max_positions: int = 512

    def __post_init__(self) -> None:
        """Reject sizes the model classes would only fail on later, with a less direct message."""
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"TinyVLMSpec.{name} must be positive, got {value}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"TinyVLMSpec.image_size ({self.image_size}) must be a multiple of "
                f"patch_size ({self.patch_size})"
            )
        for tower in ("vision", "text"):
            hidden, heads = getattr(self, f"{tower}_hidden"), getattr(self, f"{tower}_heads")
            if hidden % heads:
                raise ValueError(
                    f"TinyVLMSpec.{tower}_hidden ({hidden}) must be divisible by {tower}_heads ({heads})"
                )
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"TinyVLMSpec.vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens), "
                f"got {self.vocab_size}"
            )

    @property
    def num_image_tokens(self) -> int:
        """LLaVA's image tokens per image: one per patch (the CLS position is dropped).

        It is also LLaVA-NeXT's count for its base view; the tiles add to it.
        """
        return (self.image_size // self.patch_size) ** 2


class FamilyParts(NamedTuple):
    """What a family builder returns: everything about a checkpoint that differs between families."""

    processor: ProcessorMixin
    config: PreTrainedConfig
    generation_config: GenerationConfig


FamilyBuilder = Callable[[Iterable[str], TinyVLMSpec], FamilyParts]


def train_tokenizer(
    corpus: Iterable[str], vocab_size: int, special: SpecialTokens = LLAVA_TOKENS
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with a family's special tokens (LLaVA's by default).

    Byte level means every string encodes and decodes back unchanged, unseen words and any
    unicode included, so there is no unknown token. PAD differs from EOS so that masking padding
    never hides the eos a model must learn to emit. Padding defaults to the left, which batched
    generation needs; training code passes ``padding_side="right"`` per call where it wants it.
    """
    min_vocab_size = 256 + len(special.tokens)
    if vocab_size < min_vocab_size:
        raise ValueError(
            f"vocab_size must be at least {min_vocab_size} (256 bytes + special tokens), got {vocab_size}"
        )
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("tokenizer corpus is empty: it needs at least one non-empty string")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special.tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if special.bos is not None:
        # LLaVA-1.5 (a Llama tokenizer) prepends BOS and appends nothing; the chat template adds EOS.
        bos_id = backend.token_to_id(special.bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{special.bos} $A",
            pair=f"{special.bos} $A {special.bos} $B:1",
            special_tokens=[(special.bos, bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special.bos,
        eos_token=special.eos,
        pad_token=special.pad,
        extra_special_tokens=dict(special.named),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _text_sizes(tokenizer: PreTrainedTokenizerFast, spec: TinyVLMSpec) -> dict[str, int]:
    """The language model's sizes, the same keywords in every family's text config."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_ffn,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_heads,
        "max_position_embeddings": spec.max_positions,
    }


def _clip_llama_configs(
    tokenizer: PreTrainedTokenizerFast, spec: TinyVLMSpec
) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The CLIP vision tower and Llama decoder both LLaVA generations are made of."""
    vision_config = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text_config = LlamaConfig(
        **_text_sizes(tokenizer, spec),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return vision_config, text_config


def _single_eos_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Generation stops at the tokenizer's one eos, as LLaVA's does."""
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _llava_processor_settings(tokenizer: PreTrainedTokenizerFast, spec: TinyVLMSpec) -> dict[str, Any]:
    """What LLaVA-1.5's and LLaVA-NeXT's processors share: one image token per patch plus CLS, CLS
    dropped (``"default"``), LLaVA's conversation format."""
    return {
        "tokenizer": tokenizer,
        "patch_size": spec.patch_size,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
        "chat_template": LLAVA_CHAT_TEMPLATE,
    }


def _llava_model_settings(
    tokenizer: PreTrainedTokenizerFast, processor: ProcessorMixin, spec: TinyVLMSpec
) -> dict[str, Any]:
    """What LLaVA-1.5's and LLaVA-NeXT's model configs share: CLIP + Llama towers, the processor's
    image token, last-layer features without CLS."""
    vision_config, text_config = _clip_llama_configs(tokenizer, spec)
    return {
        "vision_config": vision_config,
        "text_config": text_config,
        "image_token_index": processor.image_token_id,
        "image_seq_length": spec.num_image_tokens,
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -1,
    }


def _build_llava(corpus: Iterable[str], spec: TinyVLMSpec) -> FamilyParts:
    """LLaVA-1.5 in miniature: CLIP vision tower, MLP projector, Llama decoder.

    The processor counts one image token per patch plus CLS and drops CLS (``"default"``
    strategy), matching what the model takes from the vision tower. The model reads the last
    vision layer rather than LLaVA's second-to-last: with two layers the last one would otherwise
    get no gradient, which distributed optimisers report as unused parameters.
    """
    tokenizer = train_tokenizer(corpus, spec.vocab_size, LLAVA_TOKENS)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(image_processor=image_processor, **_llava_processor_settings(tokenizer, spec))
    config = LlavaConfig(**_llava_model_settings(tokenizer, processor, spec))
    return FamilyParts(processor, config, _single_eos_generation_config(tokenizer))


def _build_llava_next(corpus: Iterable[str], spec: TinyVLMSpec) -> FamilyParts:
    """LLaVA-NeXT (LLaVA-1.6) in miniature: LLaVA's towers plus any-resolution tiling.

    An image is shown to the vision tower as a base view resized to ``image_size`` plus the tiles
    of the grid resolution that fits it best; the grids go up to 2 x 2 tiles so that image sizes
    change the image-token count while sequences stay short (a 64 px square gets 36 image tokens,
    a 112 px one 88). Tokenizer, conversation format and last-layer features are LLaVA's.
    """
    tokenizer = train_tokenizer(corpus, spec.vocab_size, LLAVA_TOKENS)
    side = spec.image_size
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, **_llava_processor_settings(tokenizer, spec)
    )
    config = LlavaNextConfig(
        image_grid_pinpoints=pinpoints, **_llava_model_settings(tokenizer, processor, spec)
    )
    return FamilyParts(processor, config, _single_eos_generation_config(tokenizer))


# Qwen2-VL's vision tower merges 2 x 2 neighbouring patches into one token, and its patches span
# two video frames (an image is repeated to fill them).
QWEN_MERGE_SIZE = 2
QWEN_TEMPORAL_PATCH_SIZE = 2


def _mrope_section(head_dim: int) -> list[int]:
    """Split the rotary frequencies (``head_dim / 2``) into M-RoPE's (time, height, width) parts.

    Qwen2-VL splits its 64 frequencies as [16, 24, 24]; this keeps those proportions, since the
    model raises unless the parts add up to exactly ``head_dim / 2``.
    """
    half = head_dim // 2
    spatial = 3 * half // 8
    section = [half - 2 * spatial, spatial, spatial]
    if head_dim % 2 or min(section) < 1:
        raise ValueError(
            f"Qwen text head size {head_dim} (text_hidden / text_heads) cannot be split for M-RoPE: "
            "it must be even and at least 6"
        )
    return section


def _build_qwen(
    corpus: Iterable[str],
    spec: TinyVLMSpec,
    *,
    processor_class: type[Qwen2VLProcessor] | type[Qwen2_5_VLProcessor],
    config_class: type[Qwen2VLConfig] | type[Qwen2_5_VLConfig],
    text_config_class: type[Qwen2VLTextConfig] | type[Qwen2_5_VLTextConfig],
    vision_config: Qwen2VLVisionConfig | Qwen2_5_VLVisionConfig,
) -> FamilyParts:
    """What Qwen2-VL and Qwen2.5-VL share: tokenizer, processors, text decoder, stop tokens.

    The image processor keeps an image's aspect ratio and sizes it to a multiple of a merged patch
    (``2 * patch_size``) within ``image_size**2 .. (2 * image_size)**2`` pixels, so a 64 px square
    gets 4 image tokens and a 112 px one 16 with the default spec. The video processor is never
    used by the pipeline, but the Qwen processors require one; it gets the same pixel budget.
    """
    tokenizer = train_tokenizer(corpus, spec.vocab_size, QWEN_TOKENS)
    pixels = {"min_pixels": spec.image_size**2, "max_pixels": (2 * spec.image_size) ** 2}
    patches = {
        "patch_size": spec.patch_size,
        "temporal_patch_size": QWEN_TEMPORAL_PATCH_SIZE,
        "merge_size": QWEN_MERGE_SIZE,
    }
    processor = processor_class(
        image_processor=Qwen2VLImageProcessorPil(**pixels, **patches),
        video_processor=Qwen2VLVideoProcessor(**pixels, **patches),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    token_id = tokenizer.convert_tokens_to_ids
    end_of_text = token_id("<|endoftext|>")
    text_config = text_config_class(
        **_text_sizes(tokenizer, spec),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": _mrope_section(spec.text_hidden // spec.text_heads),
        },
        # As in Qwen2-VL's config: <|endoftext|> is the nominal BOS although the tokenizer adds none.
        bos_token_id=end_of_text,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = config_class(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    # Qwen2-VL-Instruct's generation config: stop at the end of the turn or of the text.
    generation_config = GenerationConfig(
        bos_token_id=end_of_text,
        eos_token_id=[tokenizer.eos_token_id, end_of_text],
        pad_token_id=tokenizer.pad_token_id,
    )
    return FamilyParts(processor, config, generation_config)


def _build_qwen2_vl(corpus: Iterable[str], spec: TinyVLMSpec) -> FamilyParts:
    """Qwen2-VL in miniature: a ViT with 2-D rotary positions, a patch merger, a Qwen2 decoder.

    Its MLP width is a whole multiple of its width (``mlp_ratio``), so ``vision_ffn`` must be one.
    """
    if spec.vision_ffn % spec.vision_hidden:
        raise ValueError(
            f"qwen2_vl needs TinyVLMSpec.vision_ffn ({spec.vision_ffn}) to be a multiple of "
            f"vision_hidden ({spec.vision_hidden})"
        )
    vision_config = Qwen2VLVisionConfig(
        depth=spec.vision_layers,
        embed_dim=spec.vision_hidden,
        mlp_ratio=spec.vision_ffn // spec.vision_hidden,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=QWEN_MERGE_SIZE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
        hidden_size=spec.text_hidden,
    )
    return _build_qwen(
        corpus,
        spec,
        processor_class=Qwen2VLProcessor,
        config_class=Qwen2VLConfig,
        text_config_class=Qwen2VLTextConfig,
        vision_config=vision_config,
    )


def _build_qwen2_5_vl(corpus: Iterable[str], spec: TinyVLMSpec) -> FamilyParts:
    """Qwen2.5-VL in miniature: Qwen2-VL with windowed attention and a gated MLP in the ViT.

    A window spans 2 x 2 merged patches and the last vision layer attends globally, so an image
    of more than one window exercises both attention kinds, as the real model does.
    """
    vision_config = Qwen2_5_VLVisionConfig(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_ffn,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        spatial_merge_size=QWEN_MERGE_SIZE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH_SIZE,
        window_size=2 * QWEN_MERGE_SIZE * spec.patch_size,
        fullatt_block_indexes=[spec.vision_layers - 1],
        out_hidden_size=spec.text_hidden,
    )
    return _build_qwen(
        corpus,
        spec,
        processor_class=Qwen2_5_VLProcessor,
        config_class=Qwen2_5_VLConfig,
        text_config_class=Qwen2_5_VLTextConfig,
        vision_config=vision_config,
    )


FAMILIES: Mapping[str, FamilyBuilder] = MappingProxyType(
    {
        "llava": _build_llava,
        "llava_next": _build_llava_next,
        "qwen2_vl": _build_qwen2_vl,
        "qwen2_5_vl": _build_qwen2_5_vl,
    }
)


def build_tiny_vlm(
    out_dir: Path,
    corpus: Iterable[str],
    *,
    family: str = "llava",
    spec: TinyVLMSpec = TinyVLMSpec(),
    seed: int = 0,
) -> Path:
    """Build, randomly initialise and save a tiny VLM of ``family``; returns ``out_dir``.

    The weights depend only on ``seed`` and the spec (the global RNG state is left untouched).
    Everything is written to a temporary sibling first and renamed into place, so an interrupted
    build never leaves a directory that looks like a model. ``out_dir`` may exist only if empty.
    """
    if family not in FAMILIES:
        raise ArgumentError(f"unknown tiny VLM family {family!r}; known families: {sorted(FAMILIES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputNotEmpty(f"tiny VLM output {out_dir} already exists and is not an empty directory")

    processor, config, generation_config = FAMILIES[family](corpus, spec)
    processor.tokenizer.model_max_length = spec.max_positions
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared volume
    try:
        # transformers 5 writes safetensors only; the tests check that no pickle file appears.
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
