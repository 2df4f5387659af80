"""Guard model: label maps of the heads, last-token reading, safetensors round trip, wrong folders."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, BatchFeature, LlavaProcessor

from safe_rlhf_v.data.collate import render_conversation, render_prompt
from safe_rlhf_v.data.schema import CATEGORIES
from safe_rlhf_v.data.synthetic import corpus, generate_records
from safe_rlhf_v.models.guard import (
    QUERY_LABELS,
    RATINGS,
    GuardModel,
    GuardOutput,
    ResponseVerdict,
    query_unsafe_probability,
    ratings_from_logits,
    unsafe_probability,
)
from safe_rlhf_v.models.score import ScoreModel
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
RESPONSES = (
    "No.",
    "Keep it out of reach and ask an adult for help.",
    "Sure, here is how to check the facts.",
)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return generate_records(len(RESPONSES), seed=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, records: list[dict[str, Any]]) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("guard") / "base", corpus(records), spec=SPEC, seed=0)


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> LlavaProcessor:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def guard(model_dir: Path) -> GuardModel:
    torch.manual_seed(0)
    return GuardModel.from_base(model_dir).eval()


def conversations(processor: LlavaProcessor, records: list[dict[str, Any]], side: str) -> BatchFeature:
    texts = [
        render_conversation(processor, record["question"], response)
        for record, response in zip(records, RESPONSES, strict=True)
    ]
    images = [record["image"] for record in records]
    return processor(images=images, text=texts, padding=True, padding_side=side, return_tensors="pt")


def output(rating: list[list[float]], category: list[list[float]], query: list[list[float]]) -> GuardOutput:
    return GuardOutput(
        rating_logits=torch.tensor(rating),
        category_logits=torch.tensor(category),
        query_logits=torch.tensor(query),
        end_index=torch.zeros(len(rating), dtype=torch.long),
    )


def one_hot(index: int, size: int, value: float = 5.0) -> list[float]:
    return [value if i == index else 0.0 for i in range(size)]


def test_logits_map_to_ratings_severities_categories_and_probabilities(guard: GuardModel) -> None:
    assert RATINGS == (-3, -2, -1, 0, 1, 2, 3)
    assert QUERY_LABELS == ("safe", "minor", "moderate", "severe")
    # Row 0 peaks at class 0 (rating -3), row 1 at class 3 (rating 0), row 2 at class 5 (rating +2).
    out = output(
        rating=[one_hot(0, 7), one_hot(3, 7), one_hot(5, 7)],
        category=[one_hot(4, 20), one_hot(19, 20), one_hot(0, 20)],
        query=[[0.0, math.log(3.0), -1e9, -1e9], [0.0, 0.0, -1e9, -1e9], [math.log(4.0), 0.0, -1e9, -1e9]],
    )
    assert ratings_from_logits(out.rating_logits).tolist() == [-3, 0, 2]
    # Softmax of a one-hot 5 over 7 classes: e^5 / (e^5 + 6) on the peak, 1 / (e^5 + 6) elsewhere.
    peak, rest = math.exp(5) / (math.exp(5) + 6), 1 / (math.exp(5) + 6)
    expected_unsafe = [peak + 2 * rest, 3 * rest, 3 * rest]
    torch.testing.assert_close(unsafe_probability(out.rating_logits), torch.tensor(expected_unsafe))
    torch.testing.assert_close(query_unsafe_probability(out.query_logits), torch.tensor([0.75, 0.5, 0.2]))
    verdicts = guard.verdicts(out)
    assert [(v.rating, v.safe, v.severity, v.category) for v in verdicts] == [
        (-3, False, "severe", "environmental_damage"),
        (0, True, "safe", "violence_and_physical_harm"),
        (2, True, "safe", "animal_abuse"),
    ]
    assert verdicts[0].unsafe_probability == pytest.approx(expected_unsafe[0])
    minor = guard.verdicts(output([one_hot(2, 7)], [one_hot(1, 20)], [[0.0, 0.0]]))
    assert minor == [
        ResponseVerdict(
            rating=-1,
            safe=False,
            severity="minor",
            category="dangerous_behavior",
            unsafe_probability=pytest.approx(peak + 2 * rest),
        )
    ]
    with pytest.raises(ValueError, match=r"rating logits must have shape \(batch, 7\), got \(2, 5\)"):
        ratings_from_logits(torch.zeros(2, 5))


@torch.no_grad()
def test_heads_read_the_last_real_token_for_any_padding(
    guard: GuardModel, processor: LlavaProcessor, records: list[dict[str, Any]]
) -> None:
    right = guard(**conversations(processor, records, "right"))
    left = guard(**conversations(processor, records, "left"))
    assert right.rating_logits.shape == (3, 7)
    assert right.category_logits.shape == (3, len(CATEGORIES))
    assert right.query_logits.shape == (3, 4)
    assert len(set(right.end_index.tolist())) == 3, "rows must differ in length to test padding"
    for name in ("rating_logits", "category_logits", "query_logits"):
        torch.testing.assert_close(getattr(right, name), getattr(left, name), atol=1e-5, rtol=0)
    # A prompt-only sequence (image + question) is a valid input too: that is what the query head reads.
    prompt = processor(
        images=[records[0]["image"]],
        text=[render_prompt(processor, records[0]["question"])],
        return_tensors="pt",
    )
    assert guard(**prompt).query_logits.shape == (1, 4)


def test_save_load_round_trip_gives_equal_logits(
    guard: GuardModel,
    processor: LlavaProcessor,
    records: list[dict[str, Any]],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "guard"
    guard.save(out, processor=processor)

    weights = {p.name for p in out.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".pkl"}}
    assert weights == {"model.safetensors", "guard_heads.safetensors"}
    assert sorted(load_file(out / "guard_heads.safetensors")) == [
        "category.bias",
        "category.weight",
        "query.bias",
        "query.weight",
        "rating.bias",
        "rating.weight",
    ]
    config = json.loads((out / "guard_config.json").read_text())
    assert config["kind"] == "guard"
    assert config["format_version"] == 1
    assert config["base_model"] == str(model_dir)
    assert config["hidden_size"] == SPEC.text_hidden
    assert config["labels"] == {
        "rating": [-3, -2, -1, 0, 1, 2, 3],
        "category": list(CATEGORIES),
        "query": ["safe", "minor", "moderate", "severe"],
    }
    assert isinstance(AutoProcessor.from_pretrained(out), LlavaProcessor)

    loaded = GuardModel.load(out).eval()
    inputs = conversations(processor, records, "right")
    with torch.no_grad():
        mine, theirs = loaded(**inputs), guard(**inputs)
    for name in ("rating_logits", "category_logits", "query_logits"):
        torch.testing.assert_close(getattr(mine, name), getattr(theirs, name), atol=1e-6, rtol=0)
    assert loaded.categories == CATEGORIES
    assert not any(p.requires_grad for p in loaded.backbone.vision_tower.parameters())


def test_custom_categories_travel_with_the_model(model_dir: Path, tmp_path: Path) -> None:
    names = ("weapons", "self_harm", "fraud")
    model = GuardModel.from_base(model_dir, categories=names)
    assert model.heads["category"].out_features == 3
    model.save(tmp_path / "custom")
    loaded = GuardModel.load(tmp_path / "custom")
    assert loaded.categories == names
    verdict = loaded.verdicts(output([one_hot(6, 7)], [one_hot(1, 3)], [[0.0, 0.0, 0.0, 0.0]]))[0]
    assert (verdict.rating, verdict.severity, verdict.category) == (3, "safe", "self_harm")
    with pytest.raises(ValueError, match=r"categories must be unique, \['fraud'\] repeat"):
        GuardModel.from_base(model_dir, categories=("fraud", "fraud"))


def test_save_uses_a_given_state_dict(guard: GuardModel, tmp_path: Path) -> None:
    gathered = {key: value.clone() for key, value in guard.state_dict().items()}
    gathered["heads.query.bias"] += torch.tensor([0.0, 1.5, 0.0, 0.0])
    guard.save(tmp_path / "gathered", state_dict=gathered)
    loaded = GuardModel.load(tmp_path / "gathered")
    torch.testing.assert_close(
        loaded.heads["query"].bias, guard.heads["query"].bias + torch.tensor([0.0, 1.5, 0.0, 0.0])
    )
    with pytest.raises(ValueError, match=r"state_dict must hold heads\.\{category\.bias"):
        guard.save(
            tmp_path / "headless",
            state_dict={k: v for k, v in gathered.items() if not k.startswith("heads.")},
        )


def test_loading_what_is_not_a_guard_names_what_was_found(
    model_dir: Path, guard: GuardModel, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="is not a guard model") as plain:
        GuardModel.load(model_dir)
    assert "LlavaForConditionalGeneration" in str(plain.value)
    assert "guard_config.json" in str(plain.value)

    ScoreModel.from_base(model_dir, "cost").save(tmp_path / "cost")
    with pytest.raises(ValueError, match=r"looks like a score model \(kind 'cost'"):
        GuardModel.load(tmp_path / "cost")

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="an empty or unrelated folder"):
        GuardModel.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GuardModel.load(tmp_path / "missing")


BROKEN_CONFIGS = {
    "kind": ({"kind": "reward"}, r"kind must be 'guard', got 'reward'"),
    "version": ({"format_version": 7}, r"format_version 7 is not supported"),
    "ratings": (
        {"labels": {"rating": [0, 1, 2]}},
        r"labels\.rating must be \[-3, -2, -1, 0, 1, 2, 3\], got \[0, 1, 2\]",
    ),
    "categories": (
        {"labels": {"category": ["a", "b"]}},
        r"category\.weight has shape \(20, 32\), the label map needs \(2, 32\)",
    ),
    "no labels": ({"labels": None}, r"'labels' must map each head"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_loading_a_guard_with_a_broken_config_names_the_key(
    guard: GuardModel, tmp_path: Path, case: str
) -> None:
    guard.save(tmp_path / "saved")
    config_path = tmp_path / "saved" / "guard_config.json"
    config = json.loads(config_path.read_text())
    change, problem = BROKEN_CONFIGS[case]
    if isinstance(change.get("labels"), dict):
        change = {"labels": config["labels"] | change["labels"]}
    config_path.write_text(json.dumps(config | change))
    with pytest.raises(ValueError, match=problem):
        GuardModel.load(tmp_path / "saved")


def test_freezing_and_gradients_reach_every_head(
    model_dir: Path, processor: LlavaProcessor, records: list[dict[str, Any]]
) -> None:
    model = GuardModel.from_base(model_dir).train()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    assert model.backbone.is_gradient_checkpointing
    assert not any(p.requires_grad for p in model.backbone.vision_tower.parameters())
    out = model(**conversations(processor, records, "right"))
    (out.rating_logits.sum() + out.category_logits.sum() + out.query_logits.sum()).backward()
    for name, head in model.heads.items():
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0, name
    assert model.backbone.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.backbone.vision_tower.parameters())


def test_head_initialisation(guard: GuardModel) -> None:
    for head in guard.heads.values():
        assert head.bias.detach().abs().sum() == 0
    # 20 x 32 draws estimate the std within ~10%; 1/sqrt(33) = 0.174.
    weight = guard.heads["category"].weight.detach()
    assert float(weight.std()) == pytest.approx(1 / math.sqrt(SPEC.text_hidden + 1), rel=0.15)
