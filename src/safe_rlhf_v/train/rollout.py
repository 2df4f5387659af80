"""Rollouts for PPO: sample answers, then score every token the way the losses need.

A rollout is `[left-padded prompt | response, right-padded after EOS]`. The response mask is exact:
1 on what the policy generated up to and including its first EOS, 0 after it (the reference code
infers it from `log_prob != 0`, which mislabels tokens). Token `t` of the response sits at column
`P + t` and is predicted by the logits at `P + t - 1`; the critics' value of that decision is read
at the same column. Position ids follow the attention mask, so a left-padded row is scored exactly
as it was generated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ProcessorMixin

from safe_rlhf_v.data.collate import render_prompt


@dataclass
class Rollout:
    """One batch of sampled answers with everything PPO-Lagrangian needs about them."""

    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask, position_ids, pixel_values, ...
    prompt_length: int  # P: columns [0, P) hold the left-padded prompts
    response_mask: torch.Tensor  # (B, T) float
    old_log_probs: torch.Tensor  # (B, T) actor at sampling time
    ref_log_probs: torch.Tensor  # (B, T) reference policy
    reward_values: torch.Tensor  # (B, T) reward critic
    cost_values: torch.Tensor  # (B, T) cost critic (zeros in the reward-only ablation)
    rewards: torch.Tensor  # (B,) reward model at the last real token
    costs: torch.Tensor  # (B,) cost model at the last real token

    def slice(self, rows: slice) -> Rollout:
        """A micro-batch of the rollout (rows of every tensor)."""
        values: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, dict):
                values[item.name] = {k: v[rows] for k, v in value.items()}
            elif isinstance(value, torch.Tensor):
                values[item.name] = value[rows]
            else:
                values[item.name] = value
        return Rollout(**values)

    @property
    def size(self) -> int:
        return int(self.response_mask.shape[0])


def response_mask(generated: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including each row's first EOS (all of it when there is none), 0 after."""
    is_eos = generated == eos_token_id
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before t
    return (eos_before == 0).float()


def suppressed_tokens(tokenizer: Any) -> list[int]:
    """Special tokens an answer must never contain: all but EOS. A sampled image token, say,
    would make the model expect image features that do not exist."""
    return sorted(set(tokenizer.all_special_ids) - {tokenizer.eos_token_id})


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as `generate` does for left-padded prompts."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` (same leading shape)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logits(
    model: torch.nn.Module, rollout_inputs: dict[str, torch.Tensor], prompt_length: int
) -> torch.Tensor:
    """Logits that predict each response token: columns `P - 1 .. L - 2` of the model's output."""
    logits = model(**rollout_inputs, use_cache=False).logits
    return logits[:, prompt_length - 1 : -1]


def response_values(
    critic: torch.nn.Module, rollout_inputs: dict[str, torch.Tensor], prompt_length: int
) -> torch.Tensor:
    """A critic's per-token values of the decisions that produced each response token."""
    return critic(**rollout_inputs).scores[:, prompt_length - 1 : -1].float()


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
) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    """Sample one answer per prompt with the KV cache; returns (inputs, P, response mask)."""
    tokenizer = processor.tokenizer
    prompts = processor(
        images=images,
        text=[render_prompt(processor, q) for q in questions],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    ).to(device)
    extra = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in prompts.items()}
    sequences = actor.generate(
        **extra,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        suppress_tokens=suppressed_tokens(tokenizer),
        synced_gpus=synced_gpus,
    )
    prompt_length = prompts["input_ids"].shape[1]
    generated = sequences[:, prompt_length:]
    mask = response_mask(generated, tokenizer.eos_token_id)
    generated = generated.masked_fill(mask == 0, tokenizer.pad_token_id)
    attention = torch.cat([prompts["attention_mask"], mask.long()], dim=1)
    inputs = {k: v for k, v in extra.items() if k not in ("input_ids", "attention_mask")}
    inputs |= {
        "input_ids": torch.cat([prompts["input_ids"], generated], dim=1),
        "attention_mask": attention,
        "position_ids": position_ids(attention),
    }
    return inputs, prompt_length, mask
