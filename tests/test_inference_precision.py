"""Inference roles outside training (policy, guard, scorers) share one device and precision rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.evaluate.scoring import AnswerScorer
from safe_rlhf_v.models.guard import GuardModel
from safe_rlhf_v.models.inference import inference_dtype, model_inputs
from safe_rlhf_v.models.judge import GuardJudge
from safe_rlhf_v.models.policy import GenerationSettings, Policy
from safe_rlhf_v.models.score import ScoreModel


def test_gpus_run_in_bf16_and_cpus_in_fp32() -> None:
    assert inference_dtype("cuda") == torch.bfloat16
    assert inference_dtype(torch.device("cuda", 1)) == torch.bfloat16
    assert inference_dtype("cpu") == torch.float32


def test_model_inputs_cast_only_floating_tensors() -> None:
    inputs = {"input_ids": torch.tensor([[1, 2]]), "pixel_values": torch.rand(1, 3, 4, 4)}
    moved = model_inputs(inputs, "cpu", torch.bfloat16)
    assert moved["input_ids"].dtype == torch.int64 and torch.equal(moved["input_ids"], inputs["input_ids"])
    assert moved["pixel_values"].dtype == torch.bfloat16


@pytest.fixture(scope="module")
def rows(demo_data: Path) -> list[dict[str, object]]:
    split = load_split(str(demo_data), "train")
    return [split[i] for i in range(3)]


def test_policy_defaults_to_this_hosts_precision_and_answers_in_bf16(
    tiny_model: Path, rows: list[dict[str, object]]
) -> None:
    assert Policy(tiny_model).model.dtype == torch.float32  # no GPU here: CPU, fp32
    policy = Policy(tiny_model, GenerationSettings(max_new_tokens=4), dtype=torch.bfloat16)
    assert {p.dtype for p in policy.model.parameters()} == {torch.bfloat16}
    answers = policy.generate([r["image"] for r in rows], [r["question"] for r in rows])
    assert len(answers) == len(rows) and all(isinstance(a, str) for a in answers)


def test_guard_judges_requests_and_answers_in_bf16(
    tmp_path: Path, tiny_model: Path, rows: list[dict[str, object]]
) -> None:
    GuardModel.from_base(str(tiny_model)).save(
        tmp_path / "guard", processor=AutoProcessor.from_pretrained(tiny_model)
    )
    judge = GuardJudge(tmp_path / "guard", dtype=torch.bfloat16)
    assert {p.dtype for p in judge.guard.parameters()} == {torch.bfloat16}
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    queries = judge.judge_queries(images, questions)
    answers = judge.judge_answers(images, questions, ["No.", "", "Ask an adult."])
    assert len(queries) == len(answers) == len(rows)
    assert all(0.0 <= q.unsafe_probability <= 1.0 for q in queries)


def test_scorer_scores_in_the_models_precision(
    tmp_path: Path, tiny_model: Path, rows: list[dict[str, object]]
) -> None:
    ScoreModel.from_base(str(tiny_model), "reward").save(
        tmp_path / "reward", processor=AutoProcessor.from_pretrained(tiny_model)
    )
    scorer = AnswerScorer(tmp_path / "reward", batch_size=2, max_length=512, device="cpu")
    scores = scorer.score([r["image"] for r in rows], [r["question"] for r in rows], ["a", "b", "c"])
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
