"""Rollouts for PPO: sample answers, then score every token the way the losses need.

A rollout is `[left-padded prompt | response, right-padded after EOS]`. The response mask is exact:
1 on what the policy generated up to and including its first EOS, 0 after it (the reference code
infers it from `log_prob != 0`, which mislabels tokens). Token `t` of the response sits at column
`P + t` and is predicted by the logits at `P + t - 1`; the critics' value of that decision is read
at the same column. The model family (`models.family`) builds the scoring inputs from the prompt's, so
every later forward sees the positions `generate` used, and takes micro-batches of them.

The actor's old log-probs are, by default, read off the logits `generate` computed while sampling:
the sampling policy's own probabilities of the tokens it drew, at no extra cost. A rollout may leave
both critics' values empty: with one update of one micro-batch per rollout and no dropout, each
critic's first training forward computes exactly those numbers with the same weights, so the trainer
takes them from there instead of running two more forward passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PretrainedConfig, ProcessorMixin

from safe_rlhf_v.data.collate import render_prompt
from safe_rlhf_v.models.family import ModelFamily, family_of


@dataclass
class Rollout:
    """One batch of sampled answers with everything PPO-Lagrangian needs about them."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, pixel values, the family's extras
    prompt_length: int  # P: columns [0, P) hold the left-padded prompts
    family: ModelFamily  # how to take rows of `inputs`
    response_mask: torch.Tensor  # (B, T) float
    old_log_probs: torch.Tensor  # (B, T) actor at sampling time
    ref_log_probs: torch.Tensor  # (B, T) reference policy
    rewards: torch.Tensor  # (B,) reward model at the last real token
    costs: torch.Tensor  # (B,) cost model at the last real token
    # The critics' values at sampling time; None where their first training forward supplies them
    # (see the module docstring). The two are given together or not at all.
    reward_values: torch.Tensor | None = None  # (B, T) reward critic
    cost_values: torch.Tensor | None = None  # (B, T) cost critic (zeros in the reward-only ablation)

    def slice(self, rows: slice) -> Rollout:
        """A micro-batch of the rollout: its rows of every tensor, image tensors in the family's layout."""
        values: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "inputs":
                values[item.name] = self.family.slice_inputs(value, rows)
            elif isinstance(value, torch.Tensor):
                values[item.name] = value[rows]
            else:
                values[item.name] = value
        return Rollout(**values)

    @property
    def size(self) -> int:
        return int(self.response_mask.shape[0])

    @property
    def has_critic_values(self) -> bool:
        """Whether both critics' values are filled in; an error when only one of them is."""
        if (self.reward_values is None) != (self.cost_values is None):
            given = "reward_values" if self.cost_values is None else "cost_values"
            raise ValueError(f"a rollout holds {given} but not the other critic's values: give both or none")
        return self.reward_values is not None

    def critic_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward_values, cost_values), or an error saying the rollout left them to the training forward."""
        if not self.has_critic_values:
            raise ValueError(
                "this rollout lacks the critics' values: it was made for an update that reads them from "
                "the critics' training forward"
            )
        assert self.reward_values is not None and self.cost_values is not None
        return self.reward_values, self.cost_values


def stochastic_forward(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward pass of `model` draws random numbers: an active dropout
    module, or a dropout probability in a Hugging Face config (attention dropout is applied
    functionally, so no module shows it). Two such passes differ, so one cannot stand in for the
    other."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig) and _positive_dropout(config.to_dict()):
            return True
    return False


def _positive_dropout(config: dict[Any, Any]) -> bool:
    """A `*dropout*` entry above 0 anywhere in a (nested) config dict."""
    for key, value in config.items():
        if isinstance(value, dict) and _positive_dropout(value):
            return True
        number = isinstance(value, float | int) and not isinstance(value, bool)
        if "dropout" in str(key) and number and value > 0:
            return True
    return False


def response_mask(generated: torch.Tensor, end_token_ids: list[int]) -> torch.Tensor:
    """1 up to and including each row's first end token (all of it when there is none), 0 after."""
    is_end = torch.isin(generated, torch.tensor(end_token_ids, device=generated.device)).long()
    ends_before = torch.cumsum(is_end, dim=1) - is_end  # end tokens strictly before t
    return (ends_before == 0).float()


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` (same leading shape)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def policy_temperature(sampling_temperature: float) -> float:
    """The temperature of the policy PPO optimises: the one its answers are sampled at (1 for greedy
    decoding). A policy that samples at T is softmax(logits / T), so its log-probs, its ratio and its
    KL to the reference are all taken at T; at T = 1 this is the model's raw distribution."""
    return sampling_temperature if sampling_temperature > 0 else 1.0


def response_logits(
    model: torch.nn.Module,
    rollout_inputs: dict[str, torch.Tensor],
    prompt_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logits that predict each response token (columns `P - 1 .. L - 2` of the model's output),
    divided by the policy's `temperature`.

    Only the last `L - P + 1` columns go through the LM head (`logits_to_keep`): the prompt's own
    next-token logits are never used, and with a real vocabulary they dominate the head's cost.
    """
    keep = rollout_inputs["input_ids"].shape[1] - prompt_length + 1
    logits = model(**rollout_inputs, use_cache=False, logits_to_keep=keep).logits
    return logits[:, :-1] / temperature


def response_values(
    critic: torch.nn.Module, rollout_inputs: dict[str, torch.Tensor], prompt_length: int
) -> torch.Tensor:
    """A critic's per-token values of the decisions that produced each response token."""
    return critic(**rollout_inputs).scores[:, prompt_length - 1 : -1].float()


@contextlib.contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads, then restore the previous count."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Samples:
    """Sampled answers: the full inputs for scoring, the prompt width P, the response mask and, when
    asked for, the sampling policy's log-probs of the sampled tokens (masked)."""

    inputs: dict[str, torch.Tensor]  # [left-padded prompt | response] in the family's input layout
    prompt_length: int
    response_mask: torch.Tensor  # (B, T) float
    family: ModelFamily
    log_probs: torch.Tensor | None = None  # (B, T)


def sampled_log_probs(
    step_logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(token t) under the logits `generate` computed at step t divided by the policy's
    `temperature`, (B, T).

    The logits are `generate`'s raw ones, before any logits processor (top-p, suppressed tokens,
    minimum length): what the training forward computes too, at the same temperature.
    """
    if len(step_logits) != tokens.shape[1]:
        raise RuntimeError(
            f"generate returned logits for {len(step_logits)} steps but {tokens.shape[1]} new tokens; "
            "set old_log_probs_from: rollout to score the answers with a separate pass"
        )
    return torch.stack(
        [token_log_probs(logits / temperature, tokens[:, t]) for t, logits in enumerate(step_logits)], dim=1
    )


@torch.no_grad()
def sample(
    actor: torch.nn.Module,
    processor: ProcessorMixin,
    images: list[Image.Image],
    questions: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    device: torch.device,
    dtype: torch.dtype,
    synced_gpus: bool = False,
    cpu_threads: int | None = None,
    with_log_probs: bool = False,
) -> Samples:
    """Sample one answer per prompt with the KV cache.

    On a CPU, `cpu_threads` sets torch's intra-op threads for the call (None: leave them).
    `with_log_probs` also returns the log-probs of the sampled tokens at the sampling temperature
    (`policy_temperature`) from the logits the sampler computed anyway; `generate` then keeps each
    step's logits (B x vocabulary floats a token) until it returns.
    """
    tokenizer, family = processor.tokenizer, family_of(processor)
    end_ids = family.end_token_ids(tokenizer)
    prompts = processor(
        images=images,
        text=[render_prompt(processor, q) for q in questions],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(device)
    prompt_inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in prompts.items()}
    with intra_op_threads(cpu_threads if device.type == "cpu" else None):
        output = actor.generate(
            **prompt_inputs,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=end_ids,
            suppress_tokens=family.suppressed_token_ids(tokenizer),
            synced_gpus=synced_gpus,
            return_dict_in_generate=True,
            output_logits=with_log_probs,
        )
    prompt_length = prompts["input_ids"].shape[1]
    generated = output.sequences[:, prompt_length:]
    mask = response_mask(generated, end_ids)
    if with_log_probs:
        log_probs = sampled_log_probs(output.logits, generated, policy_temperature(temperature)) * mask
    else:
        log_probs = None
    generated = generated.masked_fill(mask == 0, tokenizer.pad_token_id)
    return Samples(
        family.sequence_inputs(prompt_inputs, generated, mask), prompt_length, mask, family, log_probs
    )
