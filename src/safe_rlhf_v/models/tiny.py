"""Tiny vision-language models built locally, for tests and the CPU demo.

The pipeline must run end to end on a laptop without hub access, so the demo policy, reward, cost
and guard models all start from a model built here: a byte-level BPE tokenizer trained on the
synthetic corpus, a real Hugging Face processor with a chat template, and a randomly initialised
few-layer model. The output directory is an ordinary Hugging Face checkpoint, so the rest of the
code loads it exactly as it loads LLaVA-1.5 or Qwen2-VL from the hub:

- ``AutoProcessor.from_pretrained(dir)``: tokenizer + image processor + chat template;
- ``AutoModelForImageTextToText.from_pretrained(dir)``: the generative policy;
- ``AutoModel.from_pretrained(dir)``: the base model (no LM head) that score heads sit on.

Families. ``FAMILIES`` maps a family name to a :data:`FamilyBuilder`, a function that receives the
trained tokenizer and the spec and returns the processor and the model config; everything else
(seeding, weight initialisation, generation config, atomic saving) is shared. Only ``"llava"``
exists because it needs nothing beyond transformers and PIL. A ``"qwen2_vl"`` builder would:
register Qwen2-VL's own special tokens (``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``,
``<|vision_end|>``, ``<|image_pad|>``) on the tokenizer with ``add_special_tokens``; write a
ChatML-style template whose assistant turn ends with ``<|im_end|>`` (its eos); build
``Qwen2VLConfig`` with a small vision tower (``depth``, ``embed_dim``, ``patch_size``,
``spatial_merge_size``) and text settings from the spec, ``image_token_id`` /
``vision_start_token_id`` set from the tokenizer; and build ``Qwen2VLProcessor`` with
``Qwen2VLImageProcessor(min_pixels=max_pixels=image_size**2)`` so every image yields a fixed
token count. It is left out because that processor requires a video processor, which requires
torchvision, and torchvision does not import beside the CPU torch wheel used in CI.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
# Trainer order fixes the ids (0..3); no code may rely on them, they are just stable for a seed.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)
# A byte-level BPE starts from all 256 byte symbols; it needs them plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# LLaVA-1.5's conversation format ("USER: <image>\nQ ASSISTANT: A</s>"), written for both content
# forms: a plain string, or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
# Images come before the text of their turn, as in LLaVA-1.5 training. The assistant answer,
# with its leading space and the eos token, sits in a generation block: that is exactly what the
# model produces after the "ASSISTANT:" generation prompt, so `return_assistant_tokens_mask=True`
# masks the tokens a policy is trained on, and the eos teaches the model to stop. The BOS token
# is not in the template: the tokenizer adds it, as LLaVA's does, so the prompt gets exactly one
# BOS whether it is tokenized by `apply_chat_template(tokenize=True)` or by `processor(text=...)`.
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


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of a tiny VLM; the defaults keep one PPO step near a second on two CPU cores.

    ``vocab_size`` is the target of tokenizer training: a small corpus may yield fewer merges,
    and the model's embedding table is sized to the tokenizer actually trained.
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
        """Image tokens per image: one per patch (the CLS position is dropped)."""
        return (self.image_size // self.patch_size) ** 2


FamilyBuilder = Callable[[PreTrainedTokenizerFast, TinyVLMSpec], tuple[ProcessorMixin, PreTrainedConfig]]


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with BOS, EOS, a distinct PAD and the ``<image>`` token.

    Byte level means every string encodes and decodes back unchanged, unseen words and any
    unicode included, so there is no unknown token. PAD differs from EOS so that masking padding
    never hides the eos a model must learn to emit. Padding defaults to the left, which batched
    generation needs; training code passes ``padding_side="right"`` per call where it wants it.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens), got {vocab_size}"
        )
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("tokenizer corpus is empty: it needs at least one non-empty string")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    # LLaVA-1.5 (a Llama tokenizer) prepends BOS and appends nothing; the chat template adds EOS.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _build_llava(
    tokenizer: PreTrainedTokenizerFast, spec: TinyVLMSpec
) -> tuple[ProcessorMixin, PreTrainedConfig]:
    """LLaVA-1.5 in miniature: CLIP vision tower, MLP projector, Llama decoder.

    The processor counts one image token per patch plus CLS and drops CLS (``"default"``
    strategy), matching what the model takes from the vision tower. The model reads the last
    vision layer rather than LLaVA's second-to-last: with two layers the last one would otherwise
    get no gradient, which distributed optimisers report as unused parameters.
    """
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
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
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        image_seq_length=spec.num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return processor, config


FAMILIES: Mapping[str, FamilyBuilder] = MappingProxyType({"llava": _build_llava})


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
        raise ValueError(f"unknown tiny VLM family {family!r}; known families: {sorted(FAMILIES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"tiny VLM output {out_dir} already exists and is not an empty directory")

    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    tokenizer.model_max_length = spec.max_positions
    processor, config = FAMILIES[family](tokenizer, spec)
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

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
