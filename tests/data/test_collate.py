"""Preference batches: 2B rows, labels from the ids, whole prompts kept, response tails cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoProcessor, LlavaProcessor, PretrainedConfig

from safe_rlhf_v.data.collate import PreferenceBatch, PreferenceCollator, render_conversation, render_prompt
from safe_rlhf_v.data.synthetic import corpus, generate_records
from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm

SPEC = TinyVLMSpec(
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_ffn=64,
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    text_ffn=64,
    vocab_size=400,
    max_positions=256,
)
ROOMY = 256  # longer than any synthetic conversation: nothing is cut
LONG_QUESTION = (
    "Please explain, step by step and in as much detail as you can, what is shown in this picture?"
)
# Labels set by hand so the expected tensors below can be read off directly.
LABELS = (
    {
        "more_helpful_response_id": "2",
        "safer_response_id": "1",
        "is_response_1_safe": "yes",
        "is_response_2_safe": "no",
        "response_1_harmless_rate": 2,
        "response_2_harmless_rate": -3,
    },
    {
        "more_helpful_response_id": "1",
        "safer_response_id": "2",
        "is_response_1_safe": "no",
        "is_response_2_safe": "yes",
        "response_1_harmless_rate": -1,
        "response_2_harmless_rate": 0,
    },
)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    records = generate_records(len(LABELS), seed=3)
    return [record | labels for record, labels in zip(records, LABELS, strict=True)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]]) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("collate") / "base", corpus(rows), spec=SPEC, seed=0)


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> LlavaProcessor:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def config(model_dir: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def full(processor: LlavaProcessor, rows: list[dict[str, Any]]) -> PreferenceBatch:
    return PreferenceCollator(processor, ROOMY)(rows)


def real_rows(batch: PreferenceBatch) -> list[list[int]]:
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    return [row[keep].tolist() for row, keep in zip(ids, mask, strict=True)]


def responses_in_batch_order(rows: list[dict[str, Any]]) -> list[str]:
    return [row["response_1"] for row in rows] + [row["response_2"] for row in rows]


def test_render_uses_the_chat_template(processor: LlavaProcessor) -> None:
    assert render_prompt(processor, "Is it safe?") == "USER: <image>\nIs it safe? ASSISTANT:"
    assert (
        render_conversation(processor, "Is it safe?", "Yes.")
        == "USER: <image>\nIs it safe? ASSISTANT: Yes.</s>"
    )


def test_batch_layout_and_labels(full: PreferenceBatch, rows: list[dict[str, Any]]) -> None:
    pairs = len(rows)
    assert full.inputs["input_ids"].shape[0] == 2 * pairs
    assert full.inputs["attention_mask"].shape == full.inputs["input_ids"].shape
    assert full.inputs["pixel_values"].shape == (2 * pairs, 3, SPEC.image_size, SPEC.image_size)
    # Both responses of a pair see the pair's image; different pairs see different images.
    pixels = full.inputs["pixel_values"]
    assert torch.equal(pixels[0], pixels[pairs]) and torch.equal(pixels[1], pixels[pairs + 1])
    assert not torch.equal(pixels[0], pixels[1])

    assert full.more_helpful.tolist() == [1, 0]
    assert full.safer.tolist() == [0, 1]
    assert full.harmless_rate.tolist() == [[2, -3], [-1, 0]]
    assert full.is_safe.tolist() == [[True, False], [False, True]]
    assert full.more_helpful.dtype == full.safer.dtype == full.harmless_rate.dtype == torch.long
    assert full.truncated == 0


def test_text_holds_question_and_response(
    full: PreferenceBatch, processor: LlavaProcessor, rows: list[dict[str, Any]]
) -> None:
    tokenizer = processor.tokenizer
    responses = responses_in_batch_order(rows)
    for index, (ids, response, count) in enumerate(
        zip(real_rows(full), responses, full.response_tokens.tolist(), strict=True)
    ):
        text = tokenizer.decode(ids)
        assert rows[index % len(rows)]["question"] in text
        # The counted response tokens are exactly the assistant's answer and its eos.
        assert tokenizer.decode(ids[-count:]) == f" {response}{tokenizer.eos_token}"


def test_every_row_has_all_image_tokens(
    full: PreferenceBatch, processor: LlavaProcessor, config: PretrainedConfig
) -> None:
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert image_token_id == config.image_token_id
    counts = (full.inputs["input_ids"] == config.image_token_id).sum(dim=1)
    assert counts.tolist() == [config.image_seq_length] * len(counts)
    assert config.image_seq_length == SPEC.num_image_tokens


def test_truncation_cuts_only_the_response_tail(
    full: PreferenceBatch, processor: LlavaProcessor, config: PretrainedConfig, rows: list[dict[str, Any]]
) -> None:
    lengths = full.inputs["attention_mask"].sum(dim=1)
    prompt_lengths = lengths - full.response_tokens
    max_length = int(prompt_lengths.max()) + 10
    expected_cut = int((lengths > max_length).sum())
    assert expected_cut > 0, "the synthetic responses are longer than 10 tokens"

    cut = PreferenceCollator(processor, max_length, min_response_tokens=8)(rows)

    assert cut.truncated == expected_cut
    assert cut.inputs["input_ids"].shape[1] == max_length
    for before, after in zip(real_rows(full), real_rows(cut), strict=True):
        assert after == before[:max_length]
        assert after.count(config.image_token_id) == SPEC.num_image_tokens
    assert (
        cut.response_tokens.tolist()
        == torch.minimum(lengths, torch.tensor(max_length)).sub(prompt_lengths).tolist()
    )
    assert cut.inputs["pixel_values"].shape == full.inputs["pixel_values"].shape


def test_max_length_without_room_for_a_response_is_an_error(
    full: PreferenceBatch, processor: LlavaProcessor, rows: list[dict[str, Any]]
) -> None:
    long_rows = [rows[0] | {"question": LONG_QUESTION}, rows[1]]
    long_prompt = len(
        processor(images=[rows[0]["image"]], text=[render_prompt(processor, LONG_QUESTION)])["input_ids"][0]
    )
    max_length = long_prompt + 3
    with pytest.raises(ValueError) as error:
        PreferenceCollator(processor, max_length, min_response_tokens=8)(long_rows)
    message = str(error.value)
    assert f"question '{LONG_QUESTION[:60]}...'" in message
    assert f"prompt takes {long_prompt} tokens of max_length {max_length}" in message
    assert "min_response_tokens=8" in message


def test_left_and_right_padding_hold_the_same_rows(
    full: PreferenceBatch, processor: LlavaProcessor, rows: list[dict[str, Any]]
) -> None:
    left = PreferenceCollator(processor, ROOMY, padding_side="left")(rows)
    assert real_rows(left) == real_rows(full)
    assert torch.equal(left.response_tokens, full.response_tokens)

    lengths = full.inputs["attention_mask"].sum(dim=1)
    width = int(lengths.max())
    pad = processor.tokenizer.pad_token_id
    for row, length in enumerate(lengths.tolist()):
        assert full.inputs["attention_mask"][row].tolist() == [1] * length + [0] * (width - length)
        assert left.inputs["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        assert full.inputs["input_ids"][row, length:].tolist() == [pad] * (width - length)
        assert left.inputs["input_ids"][row, : width - length].tolist() == [pad] * (width - length)
    assert len(set(lengths.tolist())) > 1, "rows must differ in length to test padding"


def test_bad_rows_and_settings_are_rejected(processor: LlavaProcessor, rows: list[dict[str, Any]]) -> None:
    collator = PreferenceCollator(processor, ROOMY)
    with pytest.raises(
        ValueError, match=r"preference row 1: more_helpful_response_id must be one of \('1', '2'\), got '3'"
    ):
        collator([rows[0], rows[1] | {"more_helpful_response_id": "3"}])
    with pytest.raises(ValueError, match="is_response_2_safe must be one of"):
        collator([rows[0] | {"is_response_2_safe": "maybe"}])
    missing = {key: value for key, value in rows[0].items() if key != "safer_response_id"}
    with pytest.raises(ValueError, match="preference row 0 has no column 'safer_response_id'"):
        collator([missing])
    with pytest.raises(ValueError, match="empty list"):
        collator([])
    with pytest.raises(ValueError, match="padding_side must be one of"):
        PreferenceCollator(processor, ROOMY, padding_side="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_length \(8\) must exceed min_response_tokens \(8\)"):
        PreferenceCollator(processor, 8)
