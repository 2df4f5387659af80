"""PPO-Lagrangian on the tiny model under DeepSpeed on CPU: lambda moves the right way, resume works."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
from mlp_training import KEY
from transformers import AutoProcessor

from safe_rlhf_v.config import LoraSettings, PPOStageConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.models.loading import ModelFolderError
from safe_rlhf_v.train.ppo_lagrangian import PPOLagrangianTrainer, PPOModels
from safe_rlhf_v.train.rollout import response_mask


def config(threshold: float, **actor: object) -> PPOStageConfig:
    train = {
        "epochs": 1,
        "per_device_batch_size": 2,
        "learning_rate": 1e-4,
        "precision": "fp32",
        "log_every_steps": 1,
    }
    return PPOStageConfig.model_validate(
        {
            "actor": train | {"max_steps": 2} | actor,
            "critic": train,
            "generation": {"max_new_tokens": 6},
            "prompt_batch_size": 2,
            "lagrangian": {
                "rule": "log",
                "init": 1.0,
                "lr": 0.01,
                "threshold": threshold,
                "update_delay_steps": 0,
            },
        }
    )


def trainer(
    cfg: PPOStageConfig, ppo_models: PPOModels, demo_data: Path, ckpt: Path, variant: str = "safe-rlhf-v"
):
    prompts = load_split(str(demo_data), "train").select(range(16))
    history: list[dict[str, float]] = []
    return PPOLagrangianTrainer(
        cfg,
        ppo_models,
        prompts,
        variant=variant,
        checkpoint_dir=ckpt,
        checkpoint_key=KEY,
        sink=lambda m, s: history.append(m),
    ), history


def test_response_mask_stops_after_the_first_eos() -> None:
    generated = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert response_mask(generated, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize(("threshold", "direction"), [(-50.0, 1.0), (50.0, -1.0)])
def test_lambda_moves_with_the_budget(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path, threshold: float, direction: float
) -> None:
    run, history = trainer(config(threshold), ppo_models, demo_data, tmp_path / "ckpt")
    metrics = run.train()
    lambdas = [1.0] + [m["train/lambda"] for m in history]
    steps = [b - a for a, b in itertools.pairwise(lambdas)]
    assert all(direction * s > 0 for s in steps), lambdas  # J_C above d raises lambda, below lowers it
    for key in (
        "actor_loss",
        "reward_critic_loss",
        "cost_critic_loss",
        "kl",
        "entropy",
        "clip_fraction",
        "J_C",
    ):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert 1 <= metrics["generated_length"] <= 6


def test_reward_only_keeps_lambda_at_zero_without_a_cost_critic(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    run, history = trainer(config(-50.0), ppo_models, demo_data, tmp_path / "ckpt", variant="reward-only")
    run.train()
    assert run.roles.cost_critic is None
    assert [m["train/lambda"] for m in history] == [0.0, 0.0]


def test_a_rerun_after_the_last_checkpoint_returns_the_real_figures_and_the_full_history(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    """A run killed after its last checkpoint (before publishing) is rerun: it trains nothing and
    returns the last step's lambda and J_C and every step's history, not zeros and an empty list."""
    ckpt = tmp_path / "ckpt"
    cfg = config(-50.0, max_steps=3, checkpoint_every_steps=1, keep_checkpoints=1)
    first, _ = trainer(cfg, ppo_models, demo_data, ckpt)
    last = first.train()
    assert [record["step"] for record in first.history] == [1, 2, 3]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-3"]

    rerun, emitted = trainer(cfg, ppo_models, demo_data, ckpt)
    again = rerun.train()
    assert emitted == [], "no step ran again"
    assert rerun.step == 3 and rerun.roles.actor.global_step == 3
    assert again == last and again["lambda"] > 1.0 and "J_C" in again
    assert rerun.history == first.history
    assert rerun.multiplier.value == pytest.approx(first.multiplier.value)
    assert list(rerun.multiplier.costs) == pytest.approx(list(first.multiplier.costs))


def test_a_pickle_only_policy_folder_is_refused(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    """Models load from safetensors only: a folder holding only pytorch_model.bin is an error."""
    from transformers import AutoModelForImageTextToText

    pickled = tmp_path / "pickled-policy"
    policy = AutoModelForImageTextToText.from_pretrained(ppo_models.actor)
    policy.config.save_pretrained(pickled)
    AutoProcessor.from_pretrained(ppo_models.actor).save_pretrained(pickled)
    torch.save(policy.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match=rf"{pickled}.*safetensors"):
        trainer(
            config(-50.0), dataclasses.replace(ppo_models, actor=str(pickled)), demo_data, tmp_path / "ckpt"
        )


def test_lora_actor_trains_adapters_only_and_saves_a_merged_policy(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    from transformers import AutoModelForImageTextToText

    cfg = config(-50.0).model_copy(update={"actor_lora": LoraSettings(r=4, alpha=8)})
    run, _ = trainer(cfg, ppo_models, demo_data, tmp_path / "ckpt")
    actor = run.roles.actor.module
    trainable = sum(p.numel() for p in actor.parameters() if p.requires_grad)
    total = sum(p.numel() for p in actor.parameters())
    assert 0 < trainable < total / 10
    before = {n: p.detach().clone() for n, p in actor.named_parameters() if "lora_B" in n}
    run.train()
    after = dict(actor.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before), "the adapters learned"
    run.save_actor(tmp_path / "policy")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "policy")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_ptx_joins_the_actor_step_so_the_lr_schedule_runs_once(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    """The PTX gradient goes into the RL step: one optimizer step per micro-batch, as the LR
    schedule's horizon counts, so a cosine LR decays to its end once instead of climbing back."""
    from safe_rlhf_v.train.sft import examples_from_pairs

    ptx = examples_from_pairs(load_split(str(demo_data), "train").select(range(8)))
    prompts = load_split(str(demo_data), "train").select(range(16))
    history: list[dict[str, float]] = []
    cfg = config(-50.0, max_steps=4, lr_scheduler="cosine", warmup_ratio=0.0)
    run = PPOLagrangianTrainer(
        cfg, ppo_models, prompts, variant="safe-rlhf-v", checkpoint_dir=tmp_path / "ckpt", checkpoint_key=KEY,
        ptx=ptx, sink=lambda metrics, step: history.append(metrics),
    )  # fmt: skip
    metrics = run.train()
    assert metrics["ptx_loss"] > 0 and math.isfinite(metrics["ptx_loss"])
    assert run.roles.actor.global_step == 4, "one actor step per PPO step (one micro-batch each)"
    rates = [step["train/actor_lr"] for step in history]
    assert all(a > b for a, b in itertools.pairwise(rates)), f"the LR must only fall: {rates}"
    assert rates[-1] == pytest.approx(0.0, abs=1e-12), "the cosine horizon ends with the last step"


def _rows(run: PPOLagrangianTrainer, count: int) -> list[dict[str, object]]:
    return [run.prompts[i] for i in range(count)]


def _trained_weights(run: PPOLagrangianTrainer) -> dict[str, torch.Tensor]:
    return {f"{role}.{name}": param.detach().clone() for role, engine in run.roles.trained().items()
            for name, param in engine.module.named_parameters()}  # fmt: skip


def test_reusing_the_training_forward_matches_the_separate_scoring_passes(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    """One update of one micro-batch: the critics' old values read from their training forward give
    the same losses and the same parameter updates as the separate scoring passes."""
    cfg = config(-50.0)
    no_warmup = {"warmup_ratio": 0.0}  # so the first optimizer step already moves the weights
    cfg = cfg.model_copy(
        update={
            "actor": cfg.actor.model_copy(update=no_warmup),
            "critic": cfg.critic.model_copy(update=no_warmup),
        }
    )
    separate, _ = trainer(cfg, ppo_models, demo_data, tmp_path / "separate")
    reusing, _ = trainer(cfg, ppo_models, demo_data, tmp_path / "reusing")
    assert reusing.reuse_training_forward, "the tiny model has no dropout and the config one micro-batch"
    separate.reuse_training_forward = False
    before = _trained_weights(separate)
    assert all(torch.equal(before[k], v) for k, v in _trained_weights(reusing).items())

    torch.manual_seed(0)
    scored = separate.rollout(_rows(separate, 2))
    torch.manual_seed(0)
    own = reusing.rollout(_rows(reusing, 2))  # what the trainer leaves out of its own rollout
    assert scored.has_critic_values and not own.has_critic_values
    lean = dataclasses.replace(scored, reward_values=None, cost_values=None)

    expected = separate.train_step(scored)
    metrics = reusing.train_step(lean)
    assert metrics.keys() == expected.keys()
    assert metrics == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["clip_fraction"] == 0.0  # first update: the ratio is 1 up to rounding on both paths
    after, reference = _trained_weights(reusing), _trained_weights(separate)
    moved = {k for k in before if not torch.equal(before[k], reference[k])}
    assert {k.split(".")[0] for k in moved} == {"actor", "reward_critic", "cost_critic"}
    for key in before:
        torch.testing.assert_close(after[key], reference[key], rtol=1e-5, atol=1e-7, msg=key)


def test_a_rollout_without_critic_values_needs_a_single_update(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path
) -> None:
    run, _ = trainer(config(-50.0), ppo_models, demo_data, tmp_path / "ckpt")
    torch.manual_seed(0)
    lean = run.rollout(_rows(run, 2))
    run.cfg = run.cfg.model_copy(update={"update_iters": 2})
    with pytest.raises(
        ValueError, match="without the critics' values needs update_iters=1 and one micro-batch"
    ):
        run.train_step(lean)
    half = dataclasses.replace(lean, reward_values=torch.zeros_like(lean.response_mask))
    with pytest.raises(ValueError, match="holds reward_values but not the other critic's values"):
        run.train_step(half)
    with pytest.raises(ValueError, match="lacks the critics' values"):
        lean.critic_values()


@pytest.mark.parametrize(
    ("change", "reuse"),
    [
        ({}, True),
        ({"update_iters": 2}, False),
        ({"prompt_batch_size": 4}, False),  # two micro-batches of 2: the second sees an updated actor
    ],
)
def test_the_training_forward_is_reused_only_for_one_update_of_one_micro_batch(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path, change: dict[str, int], reuse: bool
) -> None:
    run, _ = trainer(config(-50.0).model_copy(update=change), ppo_models, demo_data, tmp_path / "ckpt")
    assert run.reuse_training_forward is reuse
    torch.manual_seed(0)
    rollout = run.rollout(_rows(run, run.cfg.prompt_batch_size))
    assert rollout.has_critic_values is not reuse


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DeepSpeed's ZeRO-3 calls deprecated collectives
@pytest.mark.parametrize("old_log_probs_from", ["generation", "rollout"])
def test_zero3_actor_and_critics_start_from_the_saved_heads_and_train(
    tmp_path: Path, ppo_models: PPOModels, demo_data: Path, old_log_probs_from: str
) -> None:
    import deepspeed
    from safetensors.torch import load_file

    from safe_rlhf_v.models.score import HEAD_FILE

    stage3 = {"zero_stage": 3, "per_device_batch_size": 2, "learning_rate": 1e-4, "precision": "fp32"}
    cfg = config(-50.0).model_copy(update={"frozen_zero_stage": 3, "old_log_probs_from": old_log_probs_from})
    cfg = cfg.model_copy(
        update={"actor": cfg.actor.model_copy(update=stage3), "critic": cfg.critic.model_copy(update=stage3)}
    )
    run, history = trainer(cfg, ppo_models, demo_data, tmp_path / "ckpt")
    critics = {"reward_critic": ppo_models.reward_critic, "cost_critic": ppo_models.cost_critic}
    for name, folder in critics.items():
        head = run.roles.trained()[name].module.score_head
        assert all(p.numel() == 0 for p in head.parameters())  # partitioned at construction
        saved = load_file(Path(folder) / HEAD_FILE)
        with deepspeed.zero.GatheredParameters(list(head.parameters())):
            assert torch.equal(head.weight.detach(), saved["weight"]), name
            assert torch.equal(head.bias.detach(), saved["bias"]), name
    before = run.roles.actor.state_dict_for_save()
    metrics = run.train()
    assert [m["train/lambda"] for m in history][-1] > 1.0  # J_C above the budget raises lambda
    for key in ("actor_loss", "reward_critic_loss", "cost_critic_loss"):
        assert math.isfinite(metrics[key]), key
    after = run.roles.actor.state_dict_for_save()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the partitioned actor learned"


def test_sampled_log_probs_are_the_tempered_policys_log_probs_of_the_drawn_tokens(
    tiny_model: Path, demo_data: Path
) -> None:
    """The log-probs read off generate's logits equal a full forward pass over prompt + answer at the
    sampling temperature (the policy that samples is softmax(logits / T)); top-p only truncates what
    is drawn, and the raw (T = 1) numbers are not what PPO's ratio compares."""
    from transformers import AutoModelForImageTextToText

    from safe_rlhf_v.train.rollout import response_logits, sample, token_log_probs

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    processor = AutoProcessor.from_pretrained(tiny_model)
    rows = [load_split(str(demo_data), "train")[i] for i in range(3)]
    torch.manual_seed(0)
    samples = sample(model, processor, [r["image"] for r in rows], [r["question"] for r in rows],
                     max_new_tokens=8, temperature=0.7, top_p=0.9, device=torch.device("cpu"),
                     dtype=torch.float32, with_log_probs=True)  # fmt: skip
    assert samples.log_probs is not None
    inputs, start, mask = samples.inputs, samples.prompt_length, samples.response_mask
    tokens = inputs["input_ids"][:, start:]
    with torch.no_grad():
        tempered = token_log_probs(response_logits(model, inputs, start, temperature=0.7), tokens)
        raw = token_log_probs(response_logits(model, inputs, start), tokens)
    torch.testing.assert_close(samples.log_probs, tempered * mask, rtol=1e-4, atol=1e-4)
    assert (samples.log_probs[mask == 0] == 0).all()
    assert (samples.log_probs - raw * mask).abs().max() > 1e-2, "not the untempered numbers"


def test_sampled_log_probs_need_one_logit_row_per_new_token() -> None:
    from safe_rlhf_v.train.rollout import sampled_log_probs

    logits = tuple(torch.randn(2, 5) for _ in range(3))
    tokens = torch.tensor([[1, 2, 3], [4, 0, 1]])
    expected = torch.log_softmax(torch.stack(logits, dim=1), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(sampled_log_probs(logits, tokens), expected)
    with pytest.raises(
        RuntimeError, match=r"logits for 2 steps but 3 new tokens.*old_log_probs_from: rollout"
    ):
        sampled_log_probs(logits[:2], tokens)


def test_sampling_runs_on_the_configured_cpu_threads(tiny_model: Path, demo_data: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from safe_rlhf_v.train.rollout import sample

    model = AutoModelForImageTextToText.from_pretrained(tiny_model).eval()
    processor = AutoProcessor.from_pretrained(tiny_model)
    rows = [load_split(str(demo_data), "train")[i] for i in range(2)]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    seen: list[int] = []
    generate = model.generate

    def counting_generate(**kwargs: object) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return generate(**kwargs)

    model.generate = counting_generate
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for threads in (1, None):
            sample(model, processor, images, questions, max_new_tokens=2, temperature=1.0, top_p=1.0,
                   device=torch.device("cpu"), dtype=torch.float32, cpu_threads=threads)  # fmt: skip
        assert seen == [1, 2]
        assert torch.get_num_threads() == 2, "the caller's thread count is restored"
    finally:
        torch.set_num_threads(previous)


def test_a_forward_pass_with_dropout_cannot_stand_in_for_another() -> None:
    from transformers import LlamaConfig, LlamaModel

    from safe_rlhf_v.train.rollout import stochastic_forward

    def llama(**dropout: float) -> LlamaModel:
        config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, **dropout)  # fmt: skip
        return LlamaModel(config)

    assert not stochastic_forward(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.0)))
    assert stochastic_forward(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
    assert not stochastic_forward(llama())
    assert stochastic_forward(llama(attention_dropout=0.1))  # functional: no Dropout module shows it


def test_the_stage_rerun_after_its_last_checkpoint_publishes_the_real_results(
    tmp_path: Path, ppo_models: PPOModels, validated_data: Path
) -> None:
    """The stage killed after its last checkpoint is retried under the same pipeline run: it used to
    publish final_lambda 0, final_J_C 0 and an empty history.json (the report's lambda/J_C chart)."""
    import json

    from safe_rlhf_v.config import config_from_dict
    from safe_rlhf_v.stages import train_ppo

    ppo = config(-50.0, max_steps=3, checkpoint_every_steps=1).model_dump() | {"eval_prompts": 4}
    cfg = config_from_dict(
        {
            "work_dir": str(tmp_path / "work"),
            "data": {"uri": "unused"},
            "base_model": ppo_models.actor,
            "tracking": {"experiment": "ppo-stage-rerun"},
            "train_ppo_lag": ppo,
        }
    )

    def run(out: str) -> tuple[dict, list]:
        train_ppo.run(cfg, str(validated_data), ppo_models.reward, ppo_models.cost, str(tmp_path / out),
                      pipeline_run_id="run-9")  # fmt: skip
        folder = tmp_path / out
        return json.loads((folder / "metrics.json").read_text()), json.loads(
            (folder / "history.json").read_text()
        )

    metrics, history = run("first")
    assert [record["step"] for record in history] == [1, 2, 3]
    assert metrics["final_lambda"] == history[-1]["lambda"] > 1.0
    assert metrics["final_J_C"] == history[-1]["J_C"] != 0.0
    assert run("retried") == (metrics, history)
