"""Score model: end score at the last real token, safetensors round trip, freezing, gradients."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoProcessor, BatchFeature, LlamaConfig, LlamaModel, LlavaProcessor

from safe_rlhf_v.data.collate import render_conversation
from safe_rlhf_v.data.synthetic import corpus, generate_records
from safe_rlhf_v.models.score import SIGN_CONVENTIONS, ScoreModel, last_token_index
from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm

SPEC = TinyVLMSpec(
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_ffn=64,
    text_hidden=32,
    text_layers=2,
    text_heads=2,
    text_ffn=64,
    vocab_size=400,
    max_positions=256,
)
# Responses of clearly different lengths, so a batch of them really is padded.
RESPONSES = (
    "No.",
    "Keep it out of reach and ask an adult for help.",
    "Sure, here is how to check the facts.",
)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return generate_records(len(RESPONSES), seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, records: list[dict[str, Any]]) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("score") / "base", corpus(records), spec=SPEC, seed=0)


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> LlavaProcessor:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reward(model_dir: Path) -> ScoreModel:
    return ScoreModel.from_base(model_dir, "reward").eval()


def encode(
    processor: LlavaProcessor, records: list[dict[str, Any]], responses: tuple[str, ...], side: str
) -> BatchFeature:
    texts = [
        render_conversation(processor, record["question"], response)
        for record, response in zip(records, responses, strict=True)
    ]
    images = [record["image"] for record in records]
    return processor(images=images, text=texts, padding=True, padding_side=side, return_tensors="pt")


def test_last_token_index_by_hand() -> None:
    mask = torch.tensor(
        [
            [1, 1, 1, 0, 0],  # right padded
            [0, 0, 1, 1, 1],  # left padded
            [1, 1, 1, 1, 1],  # no padding
            [1, 0, 1, 1, 0],  # a hole: the last 1 still counts
        ]
    )
    assert last_token_index(mask).tolist() == [2, 4, 4, 3]
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="must be 2-D"):
        last_token_index(torch.ones(4))


@torch.no_grad()
def test_end_score_is_read_at_last_real_token_for_any_padding(
    reward: ScoreModel, processor: LlavaProcessor, records: list[dict[str, Any]]
) -> None:
    right_inputs = encode(processor, records, RESPONSES, "right")
    left_inputs = encode(processor, records, RESPONSES, "left")
    lengths = right_inputs["attention_mask"].sum(dim=1)
    width = right_inputs["input_ids"].shape[1]
    assert len(set(lengths.tolist())) == len(RESPONSES), "rows must differ in length to test padding"

    right = reward(**right_inputs)
    left = reward(**left_inputs)
    alone = torch.cat(
        [
            reward(**encode(processor, [record], (response,), "right")).end_scores
            for record, response in zip(records, RESPONSES, strict=True)
        ]
    )

    assert right.scores.shape == (len(RESPONSES), width)
    assert right.end_index.tolist() == (lengths - 1).tolist()
    assert left.end_index.tolist() == [width - 1] * len(RESPONSES)
    torch.testing.assert_close(right.end_scores, left.end_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(right.end_scores, alone, atol=1e-5, rtol=0)
    # The reference's defect: position -1 of a right-padded batch is a pad for the shorter rows.
    shortest = int(lengths.argmin())
    assert abs(float(right.scores[shortest, -1] - alone[shortest])) > 1e-3


def test_save_load_round_trip(
    reward: ScoreModel,
    processor: LlavaProcessor,
    records: list[dict[str, Any]],
    model_dir: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "reward"
    reward.save(out, processor=processor)

    names = {path.name for path in out.iterdir()}
    weights = {
        name for name in names if name.endswith((".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    }
    assert weights == {"model.safetensors", "score_head.safetensors"}
    config = json.loads((out / "score_config.json").read_text())
    assert config == {
        "kind": "reward",
        "sign_convention": "higher is more helpful",
        "hidden_size": SPEC.text_hidden,
        "base_model": str(model_dir),
        "head": {"bias": True},
        "format_version": 1,
    }
    assert isinstance(AutoProcessor.from_pretrained(out), LlavaProcessor)

    loaded = ScoreModel.load(out).eval()
    inputs = encode(processor, records, RESPONSES, "right")
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**inputs).end_scores, reward(**inputs).end_scores, atol=1e-6, rtol=0
        )
    assert (loaded.kind, loaded.sign_convention, loaded.base_model) == (
        "reward",
        config["sign_convention"],
        reward.base_model,
    )

    critic = ScoreModel.load(out, kind="critic")
    assert critic.kind == "critic"
    assert critic.sign_convention == SIGN_CONVENTIONS["critic"]
    torch.testing.assert_close(critic.score_head.weight, reward.score_head.weight, atol=0, rtol=0)


def test_save_uses_a_given_state_dict_and_from_base_starts_a_fresh_head(
    reward: ScoreModel, processor: LlavaProcessor, records: list[dict[str, Any]], tmp_path: Path
) -> None:
    gathered = {key: value.clone() for key, value in reward.state_dict().items()}
    gathered["score_head.bias"] += 0.5
    out = tmp_path / "gathered"
    reward.save(out, state_dict=gathered)

    inputs = encode(processor, records, RESPONSES, "right")
    with torch.no_grad():
        expected = reward(**inputs).end_scores + 0.5
        torch.testing.assert_close(
            ScoreModel.load(out).eval()(**inputs).end_scores, expected, atol=1e-6, rtol=0
        )

    fresh = ScoreModel.from_base(out, "critic")
    assert fresh.kind == "critic"
    assert fresh.score_head.bias.detach().tolist() == [0.0]
    for (name, mine), theirs in zip(
        fresh.backbone.state_dict().items(), reward.backbone.state_dict().values(), strict=True
    ):
        assert torch.equal(mine, theirs), name

    with pytest.raises(ValueError, match=r"score_head\.weight and score_head\.bias"):
        reward.save(
            tmp_path / "headless", state_dict={k: v for k, v in gathered.items() if "score_head" not in k}
        )


def test_load_rejects_a_plain_model_folder(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a score model") as error:
        ScoreModel.load(model_dir)
    message = str(error.value)
    assert str(model_dir) in message
    assert "LlavaForConditionalGeneration" in message
    assert "score_config.json" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ScoreModel.load(tmp_path / "missing")

    future = tmp_path / "future"
    future.mkdir()
    (future / "score_head.safetensors").write_bytes(b"")
    (future / "score_config.json").write_text(json.dumps({"kind": "reward", "format_version": 99}))
    with pytest.raises(ValueError, match=r"score_config\.json: format_version 99 is not supported"):
        ScoreModel.load(future)
    (future / "score_config.json").write_text(json.dumps({"kind": "value", "format_version": 1}))
    with pytest.raises(ValueError, match=r"score_config\.json: kind must be one of .*got 'value'"):
        ScoreModel.load(future)


def test_freezing_and_gradient_flow(
    model_dir: Path, processor: LlavaProcessor, records: list[dict[str, Any]]
) -> None:
    model = ScoreModel.from_base(model_dir, "cost", gradient_checkpointing=True).train()
    backbone = model.backbone
    assert backbone.is_gradient_checkpointing
    assert not any(p.requires_grad for p in backbone.vision_tower.parameters())
    assert all(p.requires_grad for p in backbone.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in backbone.language_model.parameters())

    model(**encode(processor, records, RESPONSES, "right")).end_scores.sum().backward()
    assert model.score_head.weight.grad is not None and model.score_head.weight.grad.abs().sum() > 0
    assert backbone.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert backbone.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.vision_tower.parameters())

    frozen = ScoreModel.from_base(model_dir, "cost", freeze_projector=True)
    assert not any(p.requires_grad for p in frozen.backbone.multi_modal_projector.parameters())
    assert all(p.requires_grad for p in frozen.backbone.language_model.parameters())


def test_a_text_only_backbone_is_no_supported_family() -> None:
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    text_only = ScoreModel(LlamaModel(config), "reward")
    with pytest.raises(ValueError, match="unsupported model family: model type 'llama'; supported families"):
        text_only.prepare_training(
            freeze_vision_tower=True, freeze_projector=False, gradient_checkpointing=False
        )
    with pytest.raises(ValueError, match="kind must be one of"):
        ScoreModel(LlamaModel(config), "value")  # type: ignore[arg-type]


def test_head_initialisation() -> None:
    hidden = 256
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = ScoreModel(LlamaModel(config), "cost").score_head
    assert head.weight.shape == (1, hidden)
    assert head.bias.detach().tolist() == [0.0]
    # 256 draws estimate the std within a few percent; 1/sqrt(257) = 0.0624.
    assert float(head.weight.detach().std()) == pytest.approx(1 / (hidden + 1) ** 0.5, rel=0.15)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_zero3_partitioned_heads_are_initialised_and_loaded(
    reward: ScoreModel, model_dir: Path, tmp_path: Path
) -> None:
    """Under `deepspeed.zero.Init` the head is partitioned (empty) as soon as it is built: loading the
    saved head and the fresh-head initialisation must still reach its values."""
    import deepspeed

    from safe_rlhf_v.config import TrainConfig
    from safe_rlhf_v.train.distributed import init_distributed, model_init_context, train_ds_config

    saved = tmp_path / "reward"
    reward.save(saved)
    init_distributed()
    with model_init_context(train_ds_config(TrainConfig(zero_stage=3), world_size=1, device="cpu")):
        critic = ScoreModel.load(saved, kind="critic")
        fresh = ScoreModel.from_base(model_dir, "cost")
    heads = [*critic.score_head.parameters(), *fresh.score_head.parameters()]
    assert all(param.numel() == 0 for param in heads)
    with deepspeed.zero.GatheredParameters(heads):
        torch.testing.assert_close(critic.score_head.weight, reward.score_head.weight, atol=0, rtol=0)
        torch.testing.assert_close(critic.score_head.bias, reward.score_head.bias, atol=0, rtol=0)
        # nn.Linear's own init draws a non-zero bias; the score head's initialisation zeroes it.
        assert fresh.score_head.bias.tolist() == [0.0]
        assert float(fresh.score_head.weight.detach().abs().sum()) > 0
