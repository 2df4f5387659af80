"""Tiny local VLMs: they load offline through the Auto classes and behave like a real checkpoint."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from jinja2 import TemplateError
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLProcessor,
)

from safe_rlhf_v.data.collate import render_prompt
from safe_rlhf_v.models.tiny import FAMILIES, QWEN_TOKENS, TinyVLMSpec, build_tiny_vlm, train_tokenizer

SPEC = TinyVLMSpec(vocab_size=300)
SUBJECTS = ("the red knife", "a small dog", "this old bridge", "the blue pill", "a crowded street")
ACTIONS = ("is shown in", "looks dangerous in", "appears harmless in", "was found near", "stands beside")
PLACES = ("the kitchen.", "the park.", "a school?", "the river!", "my house.", "a dark alley,", "the lab")


def corpus() -> list[str]:
    """Fifty short sentences, enough for a 300-entry byte-level BPE."""
    sentences = [f"{s.capitalize()} {a} {p}" for s in SUBJECTS for a in ACTIONS for p in PLACES]
    return sentences[:50]


def user_turn(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def assistant_turn(answer: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def image(color: tuple[int, int, int], size: tuple[int, int] = (100, 80)) -> Image.Image:
    return Image.new("RGB", size, color)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds each family once per module, whichever tests ask for it."""
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            out = tmp_path_factory.mktemp(family) / family
            cache[family] = build_tiny_vlm(out, corpus(), family=family, spec=SPEC, seed=0)
        return cache[family]

    return build


@pytest.fixture(scope="module")
def model_dir(built: Callable[[str], Path]) -> Path:
    return built("llava")


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> LlavaProcessor:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def policy(model_dir: Path) -> LlavaForConditionalGeneration:
    return AutoModelForImageTextToText.from_pretrained(model_dir).eval()


def test_loads_offline_through_auto_classes(model_dir: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    processor = AutoProcessor.from_pretrained(model_dir)
    policy = AutoModelForImageTextToText.from_pretrained(model_dir)
    base = AutoModel.from_pretrained(model_dir)

    assert isinstance(processor, LlavaProcessor)
    assert isinstance(policy, LlavaForConditionalGeneration)
    assert isinstance(base, LlavaModel)
    assert policy.config.dtype == torch.float32
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert policy.config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.model_max_length == SPEC.max_positions


def test_weights_are_safetensors_only(model_dir: Path) -> None:
    names = {path.name for path in model_dir.iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert model_dir.stat().st_mode & 0o777 == 0o755  # readable by other users of a shared volume
    tensors = load_file(model_dir / "model.safetensors")
    assert any("vision_tower" in key for key in tensors)
    assert any("lm_head" in key for key in tensors)


def test_processor_expands_image_to_the_tokens_the_model_consumes(
    processor: LlavaProcessor, policy: LlavaForConditionalGeneration
) -> None:
    prompt = processor.apply_chat_template([user_turn("Is this safe?")], add_generation_prompt=True)
    batch = processor(text=prompt, images=image((200, 30, 30)), return_tensors="pt")

    # 64 px / 16 px patches -> 4 x 4 = 16 placeholders, whatever the input image size.
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16
    assert policy.config.image_seq_length == 16
    assert policy.config.image_token_id == processor.image_token_id
    assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)
    with torch.no_grad():
        logits = policy(**batch).logits  # raises if placeholders and image features disagree
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))


def test_image_token_count_follows_the_spec(tmp_path: Path) -> None:
    spec = TinyVLMSpec(image_size=48, patch_size=16, vocab_size=300)
    out = build_tiny_vlm(tmp_path / "m", corpus(), spec=spec)
    processor = AutoProcessor.from_pretrained(out)
    policy = AutoModelForImageTextToText.from_pretrained(out)
    prompt = processor.apply_chat_template([user_turn("Is it?")], add_generation_prompt=True)
    batch = processor(text=prompt, images=image((0, 0, 0), (30, 90)), return_tensors="pt")

    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 9  # 3 x 3 patches
    assert tuple(batch["pixel_values"].shape) == (1, 3, 48, 48)
    with torch.no_grad():
        policy(**batch)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(
    processor: LlavaProcessor, policy: LlavaForConditionalGeneration
) -> None:
    prompts = [
        processor.apply_chat_template([user_turn(q)], add_generation_prompt=True)
        for q in ("Is the red knife in the kitchen dangerous for a small dog?", "Safe?")
    ]
    images = [image((10, 200, 10)), image((10, 10, 200))]
    batch = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1  # left padded

    greedy = {"do_sample": False, "max_new_tokens": 5, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        together = policy.generate(**batch, **greedy)
        alone = policy.generate(
            **processor(text=prompts[1:], images=images[1:], return_tensors="pt"), **greedy
        )

    width = batch["input_ids"].shape[1]
    alone_width = alone.sequences.shape[1] - len(alone.scores)
    assert together.sequences[1, width:].tolist() == alone.sequences[0, alone_width:].tolist()
    for step_together, step_alone in zip(together.scores, alone.scores, strict=True):
        torch.testing.assert_close(step_together[1], step_alone[0], atol=1e-4, rtol=1e-4)


def test_generation_stops_at_eos_from_the_saved_generation_config(
    processor: LlavaProcessor, policy: LlavaForConditionalGeneration
) -> None:
    tokenizer = processor.tokenizer
    config = policy.generation_config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    eos = tokenizer.eos_token_id

    def favour_eos(_module: torch.nn.Module, _inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(eos), logits.shape[-1])

    prompt = processor.apply_chat_template([user_turn("Stop?")], add_generation_prompt=True)
    batch = processor(text=prompt, images=image((5, 5, 5)), return_tensors="pt")
    hook = policy.lm_head.register_forward_hook(favour_eos)
    try:
        with torch.no_grad():
            out = policy.generate(**batch, do_sample=False, max_new_tokens=5)
    finally:
        hook.remove()
    assert out[0, batch["input_ids"].shape[1] :].tolist() == [eos]


def test_padding_side_is_chosen_per_call(processor: LlavaProcessor) -> None:
    texts = ["a much longer prompt than the other one", "short"]
    assert processor.tokenizer.padding_side == "left"
    left = processor.tokenizer(texts, padding=True, return_tensors="pt")["attention_mask"]
    right = processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")[
        "attention_mask"
    ]
    assert left[1, 0] == 0 and left[1, -1] == 1
    assert right[1, 0] == 1 and right[1, -1] == 0

    prompts = [processor.apply_chat_template([user_turn(q)], add_generation_prompt=True) for q in texts]
    batch = processor(
        text=prompts, images=[image((1, 2, 3))] * 2, padding=True, padding_side="right", return_tensors="pt"
    )
    assert batch["attention_mask"][1, 0] == 1 and batch["attention_mask"][1, -1] == 0
    assert batch["input_ids"][1, -1] == processor.tokenizer.pad_token_id


def test_tokenizer_round_trips_unseen_text_without_unknown_tokens(processor: LlavaProcessor) -> None:
    tokenizer = processor.tokenizer
    text = "Zyxwvut quokkas über naïve 東京 🦓 — tabs\tand  double  spaces\n trailing "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token is None

    with_specials = tokenizer(text)["input_ids"]
    assert with_specials == [tokenizer.bos_token_id, *ids]  # BOS prepended, nothing appended


def test_special_tokens_are_distinct_single_ids(processor: LlavaProcessor) -> None:
    tokenizer = processor.tokenizer
    ids = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, processor.image_token_id]
    assert None not in ids and len(set(ids)) == 4
    assert tokenizer.image_token == "<image>"
    assert (
        tokenizer("<image><image>", add_special_tokens=False)["input_ids"] == [processor.image_token_id] * 2
    )


def test_chat_template_follows_llava_and_ends_the_answer_with_eos(processor: LlavaProcessor) -> None:
    question, answer = "Is the blue pill safe?", "No, ask a doctor."
    conversation = [user_turn(question), assistant_turn(answer)]

    prompt = processor.apply_chat_template(conversation[:1], add_generation_prompt=True)
    full = processor.apply_chat_template(conversation)
    assert prompt == f"USER: <image>\n{question} ASSISTANT:"
    assert full == f"USER: <image>\n{question} ASSISTANT: {answer}</s>"
    as_strings = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    assert processor.apply_chat_template(as_strings) == f"USER: {question} ASSISTANT: {answer}</s>"

    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(full)["input_ids"]
    assert full_ids[-1] == tokenizer.eos_token_id
    assert full_ids[: len(prompt_ids)] == prompt_ids  # a response is an append, not a re-tokenization


def test_assistant_mask_covers_exactly_the_answer_and_eos(processor: LlavaProcessor) -> None:
    question, answer = "What is shown?", "A small dog."
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image((9, 9, 9))}, {"type": "text", "text": question}],
        },
        assistant_turn(answer),
    ]
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert processor.tokenizer.decode(ids[mask]) == f" {answer}</s>"
    assert int((ids == processor.tokenizer.bos_token_id).sum()) == 1


def test_chat_template_rejects_unknown_roles(processor: LlavaProcessor) -> None:
    with pytest.raises(TemplateError, match="role must be system, user or assistant, got tool"):
        processor.apply_chat_template([{"role": "tool", "content": "42"}])


def test_base_model_returns_last_hidden_states(model_dir: Path, processor: LlavaProcessor) -> None:
    base = AutoModel.from_pretrained(model_dir).eval()
    prompts = [
        processor.apply_chat_template([user_turn(q)], add_generation_prompt=True) for q in ("A?", "Bb?")
    ]
    batch = processor(text=prompts, images=[image((3, 3, 3))] * 2, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    assert tuple(hidden.shape) == (2, batch["input_ids"].shape[1], SPEC.text_hidden)


def test_weights_depend_only_on_the_seed(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_vlm(tmp_path / "again", corpus(), spec=SPEC, seed=0)
    other = build_tiny_vlm(tmp_path / "other", corpus(), spec=SPEC, seed=1)
    reference = load_file(model_dir / "model.safetensors")
    same, different = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")

    assert reference.keys() == same.keys() == different.keys()
    assert all(torch.equal(reference[key], same[key]) for key in reference)
    differing = [key for key in reference if not torch.equal(reference[key], different[key])]
    # Norm weights (ones) and biases (zeros) are seed-independent; every random matrix must change.
    for randomised in ("embed_tokens.weight", "lm_head.weight", "patch_embedding.weight", "linear_1.weight"):
        assert any(key.endswith(randomised) for key in differing), randomised
    assert (model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_build_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_vlm(tmp_path / "m", corpus(), spec=SPEC, seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_failed_build_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(LlavaProcessor, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        build_tiny_vlm(tmp_path / "m", corpus(), spec=SPEC)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        build_tiny_vlm(tmp_path / "m", corpus(), spec=SPEC)


def test_unknown_family_is_rejected_with_the_known_ones(tmp_path: Path) -> None:
    assert set(FAMILIES) == {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"}
    known = r"\['llava', 'llava_next', 'qwen2_5_vl', 'qwen2_vl'\]"
    with pytest.raises(ValueError, match=rf"unknown tiny VLM family 'idefics3'.*{known}"):
        build_tiny_vlm(tmp_path / "m", corpus(), family="idefics3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 60}, r"image_size \(60\) must be a multiple of patch_size \(16\)"),
        ({"text_hidden": 130}, r"text_hidden \(130\) must be divisible by text_heads \(4\)"),
        ({"vision_layers": 0}, "vision_layers must be positive, got 0"),
        ({"vocab_size": 100}, "vocab_size must be at least 260"),
    ],
)
def test_spec_rejects_inconsistent_sizes(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TinyVLMSpec(**changes)


def test_train_tokenizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer(["", ""], 300)
    with pytest.raises(
        ValueError, match=r"vocab_size must be at least 260 \(256 bytes \+ special tokens\), got 10"
    ):
        train_tokenizer(corpus(), 10)
    with pytest.raises(ValueError, match=r"vocab_size must be at least 263 .*got 262"):
        train_tokenizer(corpus(), 262, QWEN_TOKENS)  # Qwen has seven special tokens


# Every family: the same checkpoint contract, whatever the architecture.

SMALL, LARGE = (64, 64), (112, 112)
CLASSES: dict[str, tuple[type[ProcessorMixin], type[PreTrainedModel], type[PreTrainedModel]]] = {
    "llava": (LlavaProcessor, LlavaForConditionalGeneration, LlavaModel),
    "llava_next": (LlavaNextProcessor, LlavaNextForConditionalGeneration, LlavaNextModel),
    "qwen2_vl": (Qwen2VLProcessor, Qwen2VLForConditionalGeneration, Qwen2VLModel),
    "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel),
}
LLAVA_CHAT = ("USER: {image}{q} ASSISTANT:", " {a}</s>", "", "<image>\n")
QWEN_CHAT = (
    "<|im_start|>user\n{image}{q}<|im_end|>\n<|im_start|>assistant\n",
    "{a}<|im_end|>",
    "\n",  # Qwen2-VL-Instruct's template writes it after every <|im_end|>; it is no training target
    "<|vision_start|><|image_pad|><|vision_end|>",
)
# Per family: the prompt (with an {image} slot), the answer as generated, what follows it, the image.
CHAT = {"llava": LLAVA_CHAT, "llava_next": LLAVA_CHAT, "qwen2_vl": QWEN_CHAT, "qwen2_5_vl": QWEN_CHAT}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_dir(built: Callable[[str], Path], family: str) -> Path:
    return built(family)


@pytest.fixture(scope="module")
def family_processor(family_dir: Path) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(family_dir)


@pytest.fixture(scope="module")
def family_policy(family_dir: Path) -> PreTrainedModel:
    return AutoModelForImageTextToText.from_pretrained(family_dir, use_safetensors=True).eval()


def test_every_family_loads_offline_through_auto_classes(family: str, family_dir: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    processor_class, policy_class, base_class = CLASSES[family]
    processor = AutoProcessor.from_pretrained(family_dir)
    policy = AutoModelForImageTextToText.from_pretrained(family_dir, use_safetensors=True)
    base = AutoModel.from_pretrained(family_dir)

    assert type(processor) is processor_class
    assert type(policy) is policy_class
    assert type(base) is base_class
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert policy.config.get_text_config().vocab_size == len(processor.tokenizer)
    assert policy.config.image_token_id == processor.image_token_id
    assert processor.tokenizer.model_max_length == SPEC.max_positions
    assert processor.tokenizer.padding_side == "left"


def test_every_family_saves_safetensors_only(family_dir: Path) -> None:
    names = {path.name for path in family_dir.iterdir()}
    assert "model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert family_dir.stat().st_mode & 0o777 == 0o755
    tensors = load_file(family_dir / "model.safetensors")
    assert any("vision_tower" in key or "visual" in key for key in tensors)
    assert any("lm_head" in key for key in tensors)


@pytest.mark.parametrize(
    ("family", "small_count", "large_count"),
    [
        pytest.param(
            "llava", 16, 16, marks=pytest.mark.skip(reason="LLaVA-1.5 resizes every image to one square")
        ),
        ("llava_next", 36, 88),  # base view 4 x 4 + tiles with one newline per row: 1 x 1 or 2 x 2 tiles
        ("qwen2_vl", 4, 16),  # 64 px -> 2 x 2 merged patches of 32 px; 112 px -> 128 px -> 4 x 4
        ("qwen2_5_vl", 4, 16),
    ],
    indirect=["family"],
)
def test_image_token_count_depends_on_the_image_size(
    family: str, family_processor: ProcessorMixin, small_count: int, large_count: int
) -> None:
    prompt = render_prompt(family_processor, "Is it?")
    counts = []
    for size in (SMALL, LARGE):
        batch = family_processor(images=image((1, 2, 3), size), text=prompt, return_tensors="pt")
        counts.append(int((batch["input_ids"] == family_processor.image_token_id).sum()))
        if family == "llava_next":
            assert batch["pixel_values"].ndim == 5 and batch["image_sizes"].tolist() == [list(size)]
        else:
            assert batch["image_grid_thw"].shape == (1, 3)
    assert counts == [small_count, large_count]


def test_every_family_generates_a_left_padded_batch_of_two_image_sizes(
    family_processor: ProcessorMixin, family_policy: PreTrainedModel
) -> None:
    questions = ("Is the red knife in the kitchen dangerous for a small dog?", "Safe?")
    prompts = [render_prompt(family_processor, question) for question in questions]
    images = [image((200, 30, 30), SMALL), image((30, 30, 200), LARGE)]
    batch = family_processor(
        images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt"
    )
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[:, 0].all()  # left padded: every row ends in a real token
    assert batch["input_ids"].shape[1] < 200

    greedy = {"do_sample": False, "max_new_tokens": 4, "output_scores": True, "return_dict_in_generate": True}
    with torch.no_grad():
        together = family_policy.generate(**batch, **greedy)
        width = batch["input_ids"].shape[1]
        for row in range(2):
            single = family_processor(
                images=images[row : row + 1], text=prompts[row : row + 1], return_tensors="pt"
            )
            alone = family_policy.generate(**single, **greedy)
            steps = len(alone.scores)  # a row may stop early at an eos; padding follows it in the batch
            alone_tokens = alone.sequences[0, single["input_ids"].shape[1] :].tolist()
            assert together.sequences[row, width : width + steps].tolist() == alone_tokens
            for step_together, step_alone in zip(together.scores[:steps], alone.scores, strict=True):
                torch.testing.assert_close(step_together[row], step_alone[0], atol=1e-4, rtol=1e-4)


def test_every_family_base_model_returns_last_hidden_states(
    family_dir: Path, family_processor: ProcessorMixin
) -> None:
    base = AutoModel.from_pretrained(family_dir).eval()
    prompts = [render_prompt(family_processor, question) for question in ("A?", "Bb?")]
    images = [image((3, 3, 3), SMALL), image((4, 4, 4), LARGE)]
    batch = family_processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    assert tuple(hidden.shape) == (2, batch["input_ids"].shape[1], SPEC.text_hidden)


def test_every_family_stops_generating_at_its_end_of_turn_token(
    family_processor: ProcessorMixin, family_policy: PreTrainedModel
) -> None:
    end_of_turn = family_processor.tokenizer.eos_token_id

    def favour_end_of_turn(_module: torch.nn.Module, _inputs: tuple, logits: torch.Tensor) -> torch.Tensor:
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(end_of_turn), logits.shape[-1])

    batch = family_processor(
        images=image((5, 5, 5), SMALL), text=render_prompt(family_processor, "Stop?"), return_tensors="pt"
    )
    hook = family_policy.lm_head.register_forward_hook(favour_end_of_turn)
    try:
        with torch.no_grad():
            out = family_policy.generate(**batch, do_sample=False, max_new_tokens=5)
    finally:
        hook.remove()
    assert out[0, batch["input_ids"].shape[1] :].tolist() == [end_of_turn]


def test_every_family_chat_template_renders_prompt_and_conversation(
    family: str, family_processor: ProcessorMixin
) -> None:
    prompt_format, answer_format, trailer, image_marker = CHAT[family]
    question, answer = "Is the blue pill safe?", "No, ask a doctor."

    prompt = render_prompt(family_processor, question)
    full = family_processor.apply_chat_template([user_turn(question), assistant_turn(answer)])
    assert prompt == prompt_format.format(image=image_marker, q=question)
    assert full == prompt + answer_format.format(a=answer) + trailer
    as_strings = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    text_only = prompt_format.format(image="", q=question) + answer_format.format(a=answer) + trailer
    assert family_processor.apply_chat_template(as_strings) == text_only

    tokenizer = family_processor.tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert tokenizer(full)["input_ids"][: len(prompt_ids)] == prompt_ids  # a response is an append
    with pytest.raises(TemplateError, match="role must be system, user or assistant, got tool"):
        family_processor.apply_chat_template([{"role": "tool", "content": "42"}])


def test_every_family_assistant_mask_covers_exactly_the_answer_and_end_of_turn(
    family: str, family_processor: ProcessorMixin
) -> None:
    _, answer_format, trailer, _ = CHAT[family]
    question, answer = "What is shown?", "A small dog."
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image((9, 9, 9), SMALL)},
                {"type": "text", "text": question},
            ],
        },
        assistant_turn(answer),
    ]
    out = family_processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    tokenizer = family_processor.tokenizer
    positions = mask.nonzero().flatten().tolist()
    assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous span
    assert tokenizer.decode(ids[mask]) == answer_format.format(a=answer)
    assert int(ids[positions[-1]]) == tokenizer.eos_token_id
    assert tokenizer.decode(ids[positions[-1] + 1 :]) == trailer
    if tokenizer.bos_token_id is not None:  # the tokenizer adds it, the template does not: exactly one
        assert int((ids == tokenizer.bos_token_id).sum()) == 1


@pytest.mark.parametrize("family", QWEN_FAMILIES, indirect=True)
def test_qwen_families_follow_qwen2_vl_instruct_token_conventions(
    family_processor: ProcessorMixin, family_policy: PreTrainedModel
) -> None:
    tokenizer = family_processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_TOKENS.tokens}
    assert len(set(ids.values())) == len(QWEN_TOKENS.tokens)
    for token, token_id in ids.items():
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
    )
    text = "Is it safe?\n No — über 🦓"
    assert tokenizer(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]  # no BOS
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    generation = family_policy.generation_config
    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert generation.pad_token_id == ids["<|endoftext|>"]
    config = family_policy.config
    assert (config.image_token_id, config.video_token_id) == (ids["<|image_pad|>"], ids["<|video_pad|>"])
    assert (config.vision_start_token_id, config.vision_end_token_id) == (
        ids["<|vision_start|>"],
        ids["<|vision_end|>"],
    )
    text_config = config.get_text_config()
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    assert sum(text_config.rope_parameters["mrope_section"]) == head_dim // 2


def test_llava_next_shares_the_llava_tokenizer(built: Callable[[str], Path]) -> None:
    llava, llava_next = built("llava"), built("llava_next")
    assert (llava / "tokenizer.json").read_text() == (llava_next / "tokenizer.json").read_text()


def test_qwen2_vl_needs_a_vision_ffn_that_is_a_multiple_of_its_width(tmp_path: Path) -> None:
    spec = TinyVLMSpec(vision_ffn=100, vocab_size=300)
    with pytest.raises(ValueError, match=r"vision_ffn \(100\) to be a multiple of vision_hidden \(64\)"):
        build_tiny_vlm(tmp_path / "m", corpus(), family="qwen2_vl", spec=spec)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("qwen_family", QWEN_FAMILIES)
def test_qwen_families_reject_heads_too_small_for_mrope(tmp_path: Path, qwen_family: str) -> None:
    spec = TinyVLMSpec(text_hidden=16, text_heads=4, vocab_size=300)
    with pytest.raises(
        ValueError, match=r"head size 4 \(text_hidden / text_heads\) cannot be split for M-RoPE"
    ):
        build_tiny_vlm(tmp_path / "m", corpus(), family=qwen_family, spec=spec)
