"""Supervised fine-tuning: labels of the collator, the training loop, saving, resume, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from mlp_training import KEY
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

from safe_rlhf_v.cli import main
from safe_rlhf_v.config import TrainConfig
from safe_rlhf_v.data.collate import IGNORE_INDEX, SupervisedCollator, render_prompt
from safe_rlhf_v.data.sources import load_split, to_flat
from safe_rlhf_v.data.synthetic import write_demo_data
from safe_rlhf_v.train.checkpoint import STATE
from safe_rlhf_v.train.sft import examples_from_pairs, supervised_finetune

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ROOMY = 256  # longer than any synthetic conversation
TRAIN_PAIRS, EVAL_PAIRS = 20, 8


class Interrupted(Exception):
    """Stands in for a killed pod in the resume test."""


@pytest.fixture(scope="module")
def pairs(demo_data: Path) -> dict[str, datasets.Dataset]:
    return {
        "train": load_split(str(demo_data), "train").select(range(TRAIN_PAIRS)),
        "evaluation": load_split(str(demo_data), "evaluation").select(range(EVAL_PAIRS)),
    }


@pytest.fixture(scope="module")
def examples(pairs: dict[str, datasets.Dataset]) -> dict[str, datasets.Dataset]:
    return {split: examples_from_pairs(dataset) for split, dataset in pairs.items()}


@pytest.fixture(scope="module")
def processor(tiny_model: Path) -> LlavaProcessor:
    return AutoProcessor.from_pretrained(tiny_model)


def config(**overrides: object) -> TrainConfig:
    base: dict[str, object] = {
        "epochs": 3,
        "per_device_batch_size": 4,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant_with_warmup",
        "warmup_ratio": 0.0,
        "precision": "fp32",
        "log_every_steps": 1,
        "seed": 1,
    }
    return TrainConfig.model_validate(base | overrides)


def prompt_length(processor: LlavaProcessor, row: dict[str, Any]) -> int:
    encoded = processor(images=[row["image"]], text=[render_prompt(processor, row["question"])])
    return len(encoded["input_ids"][0])


def test_examples_from_pairs_keeps_both_responses_in_order(pairs: dict[str, datasets.Dataset]) -> None:
    paired = pairs["train"].select(range(2))
    flat = examples_from_pairs(paired)
    assert flat.column_names == ["image", "question", "response"]
    assert flat["response"] == [
        paired[0]["response_1"],
        paired[0]["response_2"],
        paired[1]["response_1"],
        paired[1]["response_2"],
    ]
    assert flat["question"] == [paired[0]["question"]] * 2 + [paired[1]["question"]] * 2
    assert flat[1]["image"].tobytes() == paired[0]["image"].tobytes()
    with pytest.raises(ValueError, match="to_flat needs the paired layout"):
        examples_from_pairs(to_flat(paired))


def test_labels_are_the_response_and_its_eos_only(
    processor: LlavaProcessor, examples: dict[str, datasets.Dataset]
) -> None:
    rows = [examples["train"][i] for i in range(4)]
    batch = SupervisedCollator(processor, ROOMY)(rows)
    tokenizer = processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert labels.shape == ids.shape and "pixel_values" in batch
    lengths = mask.sum(dim=1).tolist()
    assert len(set(lengths)) > 1, "rows must differ in length to test padding"
    for row, length, row_ids, row_mask, row_labels in zip(rows, lengths, ids, mask, labels, strict=True):
        prompt = prompt_length(processor, row)
        width = len(row_ids)
        # Right padding: real tokens first, then pad tokens that are neither attended nor targets.
        assert row_mask.tolist() == [1] * length + [0] * (width - length)
        assert row_ids[length:].tolist() == [tokenizer.pad_token_id] * (width - length)
        expected = (
            [IGNORE_INDEX] * prompt + row_ids[prompt:length].tolist() + [IGNORE_INDEX] * (width - length)
        )
        assert row_labels.tolist() == expected
        assert tokenizer.decode(row_labels[prompt:length]) == f" {row['response']}{tokenizer.eos_token}"


def test_truncation_cuts_response_targets_and_keeps_image_tokens(
    processor: LlavaProcessor, examples: dict[str, datasets.Dataset], tiny_model: Path
) -> None:
    rows = [examples["train"][i] for i in range(4)]
    prompts = [prompt_length(processor, row) for row in rows]
    max_length = max(prompts) + 9
    batch = SupervisedCollator(processor, max_length, min_response_tokens=8)(rows)
    full = SupervisedCollator(processor, ROOMY)(rows)
    model_config = AutoConfig.from_pretrained(tiny_model)
    assert batch["input_ids"].shape[1] == max_length
    assert int(full["attention_mask"].sum(dim=1).min()) > max_length, "every synthetic answer is cut"
    assert batch["attention_mask"].all()
    for i, prompt in enumerate(prompts):
        assert batch["input_ids"][i].tolist() == full["input_ids"][i, :max_length].tolist()
        image_tokens = int((batch["input_ids"][i] == model_config.image_token_id).sum())
        assert image_tokens == model_config.image_seq_length
        targets = batch["labels"][i] != IGNORE_INDEX
        assert targets.tolist() == [False] * prompt + [True] * (max_length - prompt)
        assert processor.tokenizer.eos_token_id not in batch["labels"][i].tolist(), "the cut eos is no target"


def test_bad_supervised_rows_are_rejected(
    processor: LlavaProcessor, examples: dict[str, datasets.Dataset]
) -> None:
    row = examples["train"][0]
    collator = SupervisedCollator(processor, ROOMY)
    with pytest.raises(ValueError, match="supervised row 1 has no column 'response'"):
        collator([row, {"image": row["image"], "question": row["question"]}])
    with pytest.raises(ValueError, match="empty list of supervised rows"):
        collator([])
    with pytest.raises(ValueError, match=r"max_length \(8\) must exceed min_response_tokens \(8\)"):
        SupervisedCollator(processor, 8)


def test_sft_lowers_the_held_out_loss_and_saves_a_loadable_policy(
    tmp_path: Path, tiny_model: Path, processor: LlavaProcessor, examples: dict[str, datasets.Dataset]
) -> None:
    logged: list[tuple[int, dict[str, float]]] = []
    metrics = supervised_finetune(
        str(tiny_model),
        examples["train"],
        examples["evaluation"],
        config(),
        out_dir=tmp_path / "policy",
        checkpoint_dir=tmp_path / "ckpt",
        checkpoint_key=KEY,
        max_length=ROOMY,
        sink=lambda values, step: logged.append((step, values)),
    ).metrics
    evals = [(step, values) for step, values in logged if "eval/loss" in values]
    assert [step for step, _ in evals] == [0, 10, 20, 30]  # before training, then each epoch of 40 / 4 rows
    initial, final = evals[0][1]["eval/loss"], evals[-1][1]["eval/loss"]
    assert final < 0.7 * initial, evals
    assert metrics["loss"] == final and metrics["perplexity"] == pytest.approx(math.exp(final))
    assert [step for step, values in logged if "train/loss" in values] == list(range(1, 31))

    out = tmp_path / "policy"
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == (
        processor.tokenizer.eos_token_id
    )
    policy = AutoModelForImageTextToText.from_pretrained(out).eval()
    reloaded = AutoProcessor.from_pretrained(out)
    # One batch of every evaluation row: the model's mean over all target tokens is the loss per
    # response token, which the trainer accumulated over four batches of unequal token counts.
    batch = SupervisedCollator(reloaded, ROOMY)([examples["evaluation"][i] for i in range(2 * EVAL_PAIRS)])
    with torch.no_grad():
        assert float(policy(**batch).loss) == pytest.approx(final, rel=1e-4)
    assert metrics["response_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    row = examples["evaluation"][0]
    prompt = reloaded(
        images=[row["image"]], text=[render_prompt(reloaded, row["question"])], return_tensors="pt"
    )
    with torch.no_grad():
        generated = policy.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = reloaded.tokenizer.decode(generated[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(answer.split()) >= 3, answer


def test_resume_after_interruption_continues_from_the_saved_step(
    tmp_path: Path, tiny_model: Path, examples: dict[str, datasets.Dataset]
) -> None:
    cfg = config(epochs=1, max_steps=4, checkpoint_every_steps=2)

    def run(checkpoint_dir: Path, sink: Any) -> dict[str, float]:
        return supervised_finetune(
            str(tiny_model),
            examples["train"],
            examples["evaluation"],
            cfg,
            out_dir=tmp_path / f"out-{checkpoint_dir.name}",
            checkpoint_dir=checkpoint_dir,
            checkpoint_key=KEY,
            max_length=ROOMY,
            sink=sink,
        ).metrics

    def interrupt_at_step_3(values: dict[str, float], step: int) -> None:
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(tmp_path / "resumed", interrupt_at_step_3)
    saved = tmp_path / "resumed" / "step-2"
    assert json.loads((saved / STATE).read_text())["position"] == {"epoch": 0, "batches_done": 2}

    steps: list[int] = []
    resumed = run(tmp_path / "resumed", lambda values, step: steps.append(step))
    assert steps == [3, 4, 4]  # train/loss of steps 3 and 4, then the evaluation; no step-0 evaluation
    # max_steps stopped the run mid-epoch: its checkpoint says so, and a rerun trains no further.
    final = tmp_path / "resumed" / "step-4"
    assert json.loads((final / STATE).read_text())["position"] == {"epoch": 0, "batches_done": 4}

    steps.clear()
    assert run(tmp_path / "resumed", lambda values, step: steps.append(step)) == pytest.approx(resumed)
    assert steps == []

    uninterrupted = run(tmp_path / "straight", lambda values, step: None)
    assert resumed["loss"] == pytest.approx(uninterrupted["loss"], rel=1e-5)
    weights = "model.safetensors"
    for key, tensor in load_file(tmp_path / "out-straight" / weights).items():
        torch.testing.assert_close(load_file(tmp_path / "out-resumed" / weights)[key], tensor)


def test_a_nan_loss_stops_training_with_a_clear_error(
    tmp_path: Path, tiny_model: Path, examples: dict[str, datasets.Dataset]
) -> None:
    broken = tmp_path / "broken"
    policy = AutoModelForImageTextToText.from_pretrained(tiny_model)
    policy.save_pretrained(broken)
    AutoProcessor.from_pretrained(tiny_model).save_pretrained(broken)
    weights = load_file(broken / "model.safetensors")
    head = next(key for key in weights if key.endswith("lm_head.weight"))
    weights[head][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FloatingPointError, match=r"sft: loss is nan at step 0, epoch 1.*lower learning_rate"):
        supervised_finetune(
            str(broken),
            examples["train"],
            examples["evaluation"],
            config(),
            out_dir=tmp_path / "out",
            checkpoint_dir=tmp_path / "ckpt",
            checkpoint_key=KEY,
            max_length=ROOMY,
        )


def test_make_demo_model_publishes_a_warm_started_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    write_demo_data(data, rows=16, eval_rows=4, seed=5)  # 32 examples: two steps of the demo's 16
    out = tmp_path / "models" / "policy"
    assert main(["make-demo-model", "--data", str(data), "--out", str(out), "--sft-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    loss = float(printed.split("eval loss: ")[1].split()[0])
    assert math.isfinite(loss) and loss > 0
    assert f"model: {out}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["policy"]  # no staging folder left behind
    assert AutoModelForImageTextToText.from_pretrained(out).config.model_type == "llava"
    assert render_prompt(AutoProcessor.from_pretrained(out), "Why?") == "USER: <image>\nWhy? ASSISTANT:"
    assert main(["make-demo-model", "--data", str(data), "--out", str(out)]) == 2  # nothing overwritten
    assert "already exists and is not an empty directory" in capsys.readouterr().err
