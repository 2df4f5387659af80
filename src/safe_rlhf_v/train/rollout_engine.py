"""Rollout engines: the one seam through which PPO samples its answers.

On a real multimodal model, sampling is where a PPO step spends its time, and the fastest samplers
(vLLM, SGLang) are not Hugging Face modules: they keep their own copy of the weights, their own KV
cache and often their own process. The trainer therefore talks to an engine through two calls only:
`sample` turns a batch of prompts into answers (the tokens, the response mask and, when asked for,
the behaviour policy's per-token log-probs), and `update_weights` is called after each PPO step's
actor updates so that the next rollout samples from the policy PPO just trained. Everything the
losses need beyond that (reference log-probs, rewards, costs, values) is scored by the trainer's
own engines on the returned tokens, so an engine's numerics never reach the losses unless the
config takes its log-probs as the old ones.

`HFEngine` is the Hugging Face `generate` path (`rollout.sample`), the default on CPU.

Plan for a vLLM engine: it runs as its own process from its own environment (`.venv-vllm`, whose
torch and transformers pins clash with the locked training environment), started by the trainer
and reached over a local socket, to which `sample` sends the prompt texts with the images in the
family's multimodal format and from which it gets token ids, response masks and sampled-token
log-probs back. `update_weights` streams the actor's parameters over that socket, under ZeRO-3
gathered one layer at a time so that no rank holds more than a layer beyond what vLLM keeps, and
the server applies them with `collective_rpc("reload_weights", ...)` followed by
`reset_prefix_cache()` and `reset_encoder_cache()`, because cached prefixes and image encodings
belong to the old weights (stale encoder entries kill vLLM with "Encoder cache miss"). A dead
server is a clear error from either call, never a hang, and the stage's last checkpoint stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import ProcessorMixin

from safe_rlhf_v.config import GenerationConfig
from safe_rlhf_v.train.rollout import Samples, sample


@dataclass(frozen=True)
class PromptBatch:
    """The prompts of one rollout: one image and one question per answer to sample."""

    images: list[Image.Image]
    questions: list[str]

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> PromptBatch:
        """The batch of prompt-table rows (`image` and `question` columns)."""
        return cls(images=[row["image"] for row in rows], questions=[row["question"] for row in rows])


class RolloutEngine(Protocol):
    """What the PPO trainer needs from a sampler; see the module docstring for why it is this small."""

    def sample(self, batch: PromptBatch) -> Samples:
        """One answer per prompt: `[left-padded prompt | answer]` inputs in the family's layout, the
        response mask, and the behaviour policy's log-probs of the sampled tokens at the sampling
        temperature (masked), or None for an engine built not to return them (the trainer then
        computes the old log-probs with a forward pass of its own)."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Make the next `sample` use `model`'s current weights; called once after every PPO step's
        actor updates, and after a resume restored the actor."""
        ...


class HFEngine:
    """Samples with the actor's own Hugging Face `generate` (KV cache, the trainer's device and
    precision, ZeRO-3's synchronised GPUs when partitioned across ranks).

    It holds the trainer's actor module itself, not a copy, so every optimizer step is already
    visible to the next `sample` and `update_weights` has nothing to transfer; it only checks that
    it is handed that same module, since any other one would silently leave it sampling from
    weights PPO is not training.
    """

    def __init__(
        self,
        actor: torch.nn.Module,
        processor: ProcessorMixin,
        generation: GenerationConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        synced_gpus: bool = False,
        cpu_threads: int | None = None,
        with_log_probs: bool = True,
    ) -> None:
        self.actor = actor
        self.processor = processor
        self.generation = generation
        self.device = device
        self.dtype = dtype
        self.synced_gpus = synced_gpus
        self.cpu_threads = cpu_threads
        self.with_log_probs = with_log_probs

    def sample(self, batch: PromptBatch) -> Samples:
        """`rollout.sample` in eval mode (no dropout while sampling), the actor left in train mode."""
        gen = self.generation
        self.actor.eval()
        try:
            return sample(
                self.actor,
                self.processor,
                batch.images,
                batch.questions,
                max_new_tokens=gen.max_new_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                device=self.device,
                dtype=self.dtype,
                synced_gpus=self.synced_gpus,
                cpu_threads=self.cpu_threads,
                with_log_probs=self.with_log_probs,
            )
        finally:
            self.actor.train()

    def update_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: this engine samples with `model` itself (see the class docstring)."""
        if model is not self.actor:
            raise ValueError(
                "HFEngine samples with the module it was built with; update_weights got another one "
                f"({type(model).__name__}), whose weights it would never use"
            )
