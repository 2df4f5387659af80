"""Guard training: labels from both layouts, class weights, the rating loss, metrics, a short run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import datasets
import deepspeed
import pytest
import torch
import torch.nn.functional as F
from mlp_training import KEY
from safetensors.torch import load_file
from transformers import AutoProcessor

from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.data.collate import GuardCollator, render_prompt
from safe_rlhf_v.data.schema import CATEGORIES, FLAT_FEATURES
from safe_rlhf_v.data.synthetic import corpus, generate_records, to_dataset
from safe_rlhf_v.models.guard import HEADS_FILE, GuardModel
from safe_rlhf_v.models.tiny import TinyVLMSpec, build_tiny_vlm
from safe_rlhf_v.train.checkpoint import STATE
from safe_rlhf_v.train.distributed import init_distributed, model_init_context, train_ds_config
from safe_rlhf_v.train.guard import (
    LABEL_COLUMNS,
    RATING_TARGETS,
    UNRATED_SAFE,
    UNRATED_UNSAFE,
    GuardEvalTable,
    GuardSettings,
    class_weights,
    guard_metrics,
    guard_rows,
    rating_loss,
    train_guard,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

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
# Pair labels set by hand; the expected guard labels below are read off these.
PAIRS = (
    {  # benign image, two safe answers: a safe request
        "category": "animal_abuse",
        "image_severity": 0,
        "is_response_1_safe": "yes",
        "is_response_2_safe": "yes",
        "response_1_harmless_rate": 2,
        "response_2_harmless_rate": 0,
    },
    {  # benign image but one harmful answer: the request is unsafe
        "category": "hacking_or_digital_crime",
        "image_severity": 0,
        "is_response_1_safe": "no",
        "is_response_2_safe": "yes",
        "response_1_harmless_rate": -2,
        "response_2_harmless_rate": 1,
    },
    {  # harmful image, both answers safe: the request is unsafe by its image
        "category": "sexual_crimes",
        "image_severity": 2,
        "is_response_1_safe": "yes",
        "is_response_2_safe": "yes",
        "response_1_harmless_rate": 3,
        "response_2_harmless_rate": 0,
    },
)


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return [record | labels for record, labels in zip(generate_records(3, seed=5), PAIRS, strict=True)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = corpus(generate_records(40, seed=0))
    return build_tiny_vlm(tmp_path_factory.mktemp("guard-train") / "base", texts, spec=SPEC, seed=0)


def flat_rows(records: list[dict[str, Any]], answers: list[tuple[int, str, str]]) -> datasets.Dataset:
    """Flattened rows (no harmless_rate): (index of the record giving image+question, answer, is_safe)."""
    rows = [
        {
            "question": records[source]["question"],
            "image": records[source]["image"],
            "category": records[source]["category"],
            "image_severity": 0,
            "response": response,
            "is_response_safe": safe,
        }
        for source, response, safe in answers
    ]
    return datasets.Dataset.from_list(rows, features=FLAT_FEATURES)


def test_guard_rows_from_pairs(records: list[dict[str, Any]]) -> None:
    rows = guard_rows(to_dataset(records))
    assert rows.column_names == ["image", "question", "response", *LABEL_COLUMNS]
    # Rows alternate response_1, response_2 of each pair; target index = rating + 3.
    assert list(rows["rating_target"]) == [5, 3, 1, 4, 6, 3]
    assert list(rows["category_id"]) == [CATEGORIES.index(PAIRS[i]["category"]) for i in (0, 0, 1, 1, 2, 2)]
    # Request levels: safe; minor (a harmful answer on a benign image); moderate (image severity 2).
    assert list(rows["query_level"]) == [0, 0, 1, 1, 2, 2]
    assert rows[2]["response"] == records[1]["response_1"]
    assert RATING_TARGETS[1] == "-2"


def test_guard_rows_from_flat_rows_group_answers_by_request(records: list[dict[str, Any]]) -> None:
    # Rows 0 and 1 answer the same request (same question and image); row 2 has record 0's question
    # but record 1's image, so it is another request, safe on its own.
    answers = [(0, "Here is a safe answer.", "yes"), (0, "Here is a harmful answer.", "no")]
    shuffled = flat_rows(records, answers)
    same_question_other_image = flat_rows(records, [(1, "Fine.", "yes")]).map(
        lambda row: {"question": records[0]["question"]}
    )
    rows = guard_rows(datasets.concatenate_datasets([shuffled, same_question_other_image]))
    assert list(rows["rating_target"]) == [UNRATED_SAFE, UNRATED_UNSAFE, UNRATED_SAFE]
    assert list(rows["query_level"]) == [1, 1, 0]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"response_2_harmless_rate": -1},
            r"pair 0 response_2: harmless_rate -1 and is_response_safe 'yes' contradict",
        ),
        ({"response_1_harmless_rate": 5}, r"pair 0 response_1: harmless_rate 5 is outside -3\.\.3"),
        (
            {"is_response_1_safe": "maybe"},
            r"pair 0 response_1: is_response_safe must be one of \('yes', 'no'\)",
        ),
        (
            {"category": "weather"},
            r"pair 0 response_1: category 'weather' is not one of the 20 guard categories",
        ),
    ],
)
def test_guard_rows_name_the_row_and_column_of_a_bad_label(
    records: list[dict[str, Any]], changes: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        guard_rows(to_dataset([records[0] | changes, *records[1:]]))


def test_class_weights_by_hand() -> None:
    # n = 6 labels over k = 3 present classes: w_c = 6 / (3 * n_c); classes 2 and 4 are absent.
    weights = class_weights([0, 0, 0, 1, 1, 3], num_classes=5, max_weight=10.0)
    torch.testing.assert_close(weights, torch.tensor([2 / 3, 1.0, 1.0, 2.0, 1.0]))
    clipped = class_weights([0, 0, 0, 1, 1, 3], num_classes=5, max_weight=1.2)
    torch.testing.assert_close(clipped, torch.tensor([1 / 1.2, 1.0, 1.0, 1.2, 1.0]))
    assert class_weights([0, 0, 0, 1, 1, 3], num_classes=5, max_weight=1.0).tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="empty label list"):
        class_weights([], num_classes=3, max_weight=10.0)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2, got 0\.\.3"):
        class_weights([0, 3], num_classes=3, max_weight=10.0)


def test_rating_loss_is_weighted_cross_entropy_and_coarse_label_likelihood() -> None:
    weights = torch.tensor([1.0, 2.0, 1.0, 0.5, 1.0, 3.0, 1.0, 2.0, 1.0])
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0, 0.5, 1.0, -0.2], [1.0, 0.0, 0.0, 2.0, -1.0, 0.0, 0.5]])
    exact = torch.tensor([5, 1])
    torch.testing.assert_close(
        rating_loss(logits, exact, weights), F.cross_entropy(logits, exact, weight=weights[:7])
    )
    # Uniform logits: P(safe) = 4/7 (ratings 0..3), P(unsafe) = 3/7; weights 2 (safe) and 1 (unsafe).
    coarse = rating_loss(torch.zeros(2, 7), torch.tensor([UNRATED_SAFE, UNRATED_UNSAFE]), weights)
    expected = (2 * -math.log(4 / 7) + 1 * -math.log(3 / 7)) / 3
    assert float(coarse) == pytest.approx(expected)


def test_metrics_against_a_hand_computation() -> None:
    # Rows: true rating -3, -2, 0, +2, safe (unrated), unsafe (unrated); predicted -3, -1, +1, -2, 0, +2.
    table = GuardEvalTable(
        rating_pred=torch.tensor([0, 2, 4, 1, 3, 5]),
        rating_target=torch.tensor([0, 1, 3, 5, UNRATED_SAFE, UNRATED_UNSAFE]),
        category_pred=torch.tensor([0, 1, 1, 1, 2, 0]),
        category_true=torch.tensor([0, 0, 1, 1, 2, 2]),
        query_pred=torch.tensor([1, 0, 0, 1, 1, 1]),
        query_true=torch.tensor([1, 1, 0, 0, 1, 1]),
    )
    metrics = guard_metrics(table, ["a", "b", "c"])
    confusion = metrics.pop("confusion")
    # unsafe true [1,1,0,0,0,1], predicted [1,1,0,1,0,0]: TP 2, FP 1, FN 1.
    # Rated rows (first 4): ratings right 1/4; severities severe, moderate, safe, safe predicted as
    # severe, minor, safe, moderate: right 2/4; per-class F1 severe 1, moderate 0, minor 0, safe 2/3.
    # Categories: F1 a 1/2, b 4/5, c 2/3. Query: TP 3, FP 1, FN 1.
    assert metrics == pytest.approx(
        {
            "rows": 6.0,
            "rated_rows": 4.0,
            "safe_accuracy": 4 / 6,
            "unsafe_precision": 2 / 3,
            "unsafe_recall": 2 / 3,
            "unsafe_f1": 2 / 3,
            "rating_accuracy": 1 / 4,
            "severity_accuracy": 2 / 4,
            "severity_macro_f1": (1 + 0 + 0 + 2 / 3) / 4,
            "category_accuracy": 4 / 6,
            "category_macro_f1": (1 / 2 + 4 / 5 + 2 / 3) / 3,
            "query_accuracy": 4 / 6,
            "query_unsafe_precision": 3 / 4,
            "query_unsafe_recall": 3 / 4,
            "query_unsafe_f1": 3 / 4,
            "query_severity_accuracy": 4 / 6,
        }
    )
    assert confusion["safety"] == {"labels": ["safe", "unsafe"], "matrix": [[2, 1], [1, 2]]}
    assert confusion["severity"] == {
        "labels": ["safe", "minor", "moderate", "severe"],
        "matrix": [[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]],
    }
    assert confusion["category"] == {"labels": ["a", "b", "c"], "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 1]]}
    assert confusion["query"] == {
        "labels": ["safe", "minor", "moderate", "severe"],
        "matrix": [[1, 1, 0, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    }
    rating = confusion["rating"]
    assert rating["labels"] == ["-3", "-2", "-1", "0", "1", "2", "3"]
    assert sum(map(sum, rating["matrix"])) == 4
    assert (
        rating["matrix"][0][0]
        == rating["matrix"][1][2]
        == rating["matrix"][3][4]
        == rating["matrix"][5][1]
        == 1
    )

    unrated = GuardEvalTable(*(column[4:] for column in vars(table).values()))
    without = guard_metrics(unrated, ["a", "b", "c"])
    assert without["rated_rows"] == 0.0
    assert "rating_accuracy" not in without and "severity" not in without["confusion"]


def test_collator_pairs_conversations_with_prompt_only_sequences(
    model_dir: Path, records: list[dict[str, Any]]
) -> None:
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = guard_rows(to_dataset(records))
    batch = GuardCollator(processor, 256, label_columns=LABEL_COLUMNS)([rows[i] for i in range(4)])
    assert batch.labels["rating_target"].tolist() == [5, 3, 1, 4]
    assert batch.labels["query_level"].tolist() == [0, 0, 1, 1]
    assert batch.truncated == 0
    alone = processor(images=[records[1]["image"]], text=[render_prompt(processor, records[1]["question"])])
    mask = batch.prompts["attention_mask"][2].bool()
    assert batch.prompts["input_ids"][2][mask].tolist() == alone["input_ids"][0]
    conversation = batch.conversations["input_ids"][2][batch.conversations["attention_mask"][2].bool()]
    assert conversation[: int(mask.sum())].tolist() == alone["input_ids"][0]
    assert len(conversation) > int(mask.sum())
    with pytest.raises(ValueError, match="guard row 0: label column 'query_level' must hold integers"):
        GuardCollator(processor, 256, label_columns=LABEL_COLUMNS)([rows[0] | {"query_level": "yes"}])


def test_heads_built_under_zero3_are_initialised_as_without_it(model_dir: Path) -> None:
    init_distributed()
    config = train_ds_config(TrainConfig(zero_stage=3), world_size=1, device="cpu")
    with model_init_context(config):
        model = GuardModel.from_base(model_dir)
    head = model.heads["category"]
    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        assert head.weight.shape == (len(CATEGORIES), SPEC.text_hidden)
        assert head.bias.abs().sum() == 0
        assert float(head.weight.detach().std()) == pytest.approx(
            1 / math.sqrt(SPEC.text_hidden + 1), rel=0.2
        )


def guard_settings(model_dir: Path, **train: object) -> GuardSettings:
    """Guard settings on the tiny model with a constant learning rate (runs and resumes compare)."""
    constant = {"learning_rate": 2e-3, "lr_scheduler": "constant_with_warmup", "warmup_ratio": 0.0}
    return GuardSettings(
        base_model=str(model_dir), train=TrainConfig(**(constant | train)), max_length=256, eval_batch_size=16
    )


def test_a_few_steps_lower_the_loss_then_resume_and_load(model_dir: Path, tmp_path: Path) -> None:
    # 8 pairs -> 16 rows = one batch: every step sees the same rows, so the losses are comparable.
    data = to_dataset(generate_records(8, seed=11))
    settings = guard_settings(model_dir, epochs=6, per_device_batch_size=16, log_every_steps=1)
    logged: list[tuple[int, dict[str, float]]] = []
    metrics = train_guard(
        settings,
        train=data,
        evaluation=data,
        out_dir=tmp_path / "guard",
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_key=KEY,
        sink=lambda values, step: logged.append((step, values)),
    ).metrics
    steps = [values for _, values in logged if "train/loss" in values]
    assert len(steps) == 6
    losses = [values["train/loss"] for values in steps]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    for part in ("rating", "category", "query"):
        assert steps[-1][f"train/{part}_loss"] < steps[0][f"train/{part}_loss"], part
    assert sum("eval/safe_accuracy" in values for _, values in logged) == 6
    assert {"safe_accuracy", "severity_accuracy", "category_macro_f1", "query_accuracy"} <= set(metrics)
    assert sum(map(sum, metrics["confusion"]["safety"]["matrix"])) == 16

    loaded = GuardModel.load(tmp_path / "guard")
    assert loaded.categories == CATEGORIES
    assert (tmp_path / "guard" / "processor_config.json").is_file()

    # Resuming after the last epoch trains nothing and evaluates the restored weights.
    resumed: list[dict[str, float]] = []
    again = train_guard(
        settings,
        train=data,
        evaluation=data,
        out_dir=None,
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_key=KEY,
        sink=lambda values, step: resumed.append(values),
    ).metrics
    assert resumed == []
    assert again == metrics


def test_a_max_steps_stop_mid_epoch_is_continued_not_skipped(model_dir: Path, tmp_path: Path) -> None:
    """After a `max_steps` stop the checkpoint records the batch reached, not the next epoch (guard
    training used to): a rerun with a higher cap trains the rest of that epoch, exactly as a run
    that never stopped."""
    data = to_dataset(generate_records(8, seed=11))  # 16 rows: 4 batches of 4 per epoch

    def run(max_steps: int, checkpoints: Path) -> dict[str, torch.Tensor]:
        settings = guard_settings(model_dir, epochs=2, max_steps=max_steps, per_device_batch_size=4)
        out = tmp_path / f"guard-{checkpoints.name}-{max_steps}"
        train_guard(
            settings, train=data, evaluation=data, out_dir=out, checkpoint_dir=checkpoints, checkpoint_key=KEY
        )
        return load_file(out / "model.safetensors") | load_file(out / HEADS_FILE)

    run(2, tmp_path / "stopped")
    state = json.loads((tmp_path / "stopped" / "step-2" / STATE).read_text())
    assert state["position"] == {"epoch": 0, "batches_done": 2}
    continued = run(6, tmp_path / "stopped")
    straight = run(6, tmp_path / "straight")
    assert continued.keys() == straight.keys()
    for key, tensor in straight.items():
        assert torch.equal(continued[key], tensor), key
