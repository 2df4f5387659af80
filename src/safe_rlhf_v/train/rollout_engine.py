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

`VLLMEngine` samples with vLLM, which runs as its own process from its own environment
(`.venv-vllm`, `make vllm-env`: vLLM's torch and transformers pins clash with the locked training
environment). It starts `rollout_server.py` with that venv's Python and talks to it over a Unix
socket in length-prefixed JSON (never pickle): `sample` sends each prompt's token ids with the
family's one image token unexpanded (vLLM expands it), with its image as PNG bytes,
and gets the sampled token ids and log-probs back. `update_weights` writes the actor's state dict
as safetensors under vLLM's weight names to a temporary folder and asks the server to reload it;
the server then drops its prefix and encoder caches, which belong to the old weights. A dead
server is a one-line `UserError` from either call, never a hang.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import ProcessorMixin

from safe_rlhf_v.config import GenerationConfig
from safe_rlhf_v.data.collate import render_prompt
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.models.family import UnsupportedFamily, family_of
from safe_rlhf_v.train.rollout import Samples, response_mask, sample


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

    def close(self) -> None:
        """Release what the engine holds outside the trainer (a server process, temporary files)."""
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

    def close(self) -> None:
        """Nothing to release: the actor belongs to the trainer."""


SERVER_SCRIPT = Path(__file__).resolve().parent.parent / "rollout_server.py"
_HEADER = struct.Struct(">I")
# vLLM's LLaVA loader reads the classic Hugging Face layout, with the CLIP tower under
# `vision_model.`; transformers 5 names the same tensors differently in memory. Prefix in memory ->
# prefix for vLLM, first match wins.
_VLLM_NAMES = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
)
_VLLM_FAMILIES = ("llava", "llava_next")


class RolloutServerError(UserError, RuntimeError):
    """The vLLM rollout server died, never came up, or refused a request."""


def vllm_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights on the CPU under vLLM's names, each tensor its own storage (safetensors
    refuses tensors that share memory, as tied embeddings do)."""
    weights = {}
    for name, tensor in model.state_dict().items():
        for old, new in _VLLM_NAMES:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        else:
            raise UnsupportedFamily(
                f"no vLLM name for the weight {name!r}: VLLMEngine reads LLaVA layouts only"
            )
        weights[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return weights


class VLLMEngine:
    """Samples with vLLM in a server process (`rollout_server.py`) run by `python`, the vLLM venv's.

    At start it writes the actor (renamed weights, its config and the processor) to a temporary
    model folder and starts the server on it; `close` stops the server and removes the folder.
    Only LLaVA families are supported: their weight names are the only ones mapped to vLLM's.
    """

    def __init__(
        self,
        actor: torch.nn.Module,
        processor: ProcessorMixin,
        generation: GenerationConfig,
        *,
        python: str | Path,
        device: torch.device,
        dtype: torch.dtype,
        with_log_probs: bool = True,
        max_model_len: int | None = None,
        seed: int = 0,
        startup_timeout: float = 300.0,
    ) -> None:
        family = family_of(processor)
        if family.name not in _VLLM_FAMILIES:
            raise UnsupportedFamily(f"rollout engine vllm supports {_VLLM_FAMILIES}, not {family.name!r}")
        if not Path(python).is_file():
            raise RolloutServerError(f"no vLLM venv Python at {python}: run `make vllm-env`")
        self.processor = processor
        self.generation = generation
        self.device = device
        self.dtype = dtype
        self.with_log_probs = with_log_probs
        self.family = family
        self.workdir = Path(tempfile.mkdtemp(prefix="vllm-rollout-"))
        model_dir = self.workdir / "model"
        actor.config.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        if getattr(actor, "generation_config", None) is not None:
            actor.generation_config.save_pretrained(model_dir)
        save_file(vllm_state_dict(actor), model_dir / "model.safetensors")
        self.log_path = self.workdir / "server.log"
        socket_path = self.workdir / "server.sock"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(python),
                    str(SERVER_SCRIPT),
                    "--model",
                    str(model_dir),
                    "--socket",
                    str(socket_path),
                    "--seed",
                    str(seed),
                    *(["--max-model-len", str(max_model_len)] if max_model_len else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.conn = self._connect(socket_path, startup_timeout)

    def _connect(self, path: Path, timeout: float) -> socket.socket:
        """The server's socket once it listens; an error as soon as the process exits, never a hang."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                self.close()
                raise RolloutServerError(
                    f"vLLM rollout server did not start within {timeout:.0f} s; log: {self.log_path}"
                )
            time.sleep(0.2)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(path))
        return conn

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            tail = (
                self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                if self.log_path.exists()
                else []
            )
            raise RolloutServerError(
                f"vLLM rollout server (pid {self.process.pid}) exited with code {code}; log {self.log_path}"
                + (f": {tail[0][:200]}" if tail else "")
            )

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer; a dead server or a refused request is an error."""
        self._check_alive()
        body = json.dumps(message).encode()
        try:
            self.conn.sendall(_HEADER.pack(len(body)) + body)
            header = self._read(_HEADER.size)
            reply = json.loads(self._read(_HEADER.unpack(header)[0]))
        except (OSError, ConnectionError) as error:
            self.process.wait(timeout=10)
            self._check_alive()
            raise RolloutServerError(
                f"vLLM rollout server (pid {self.process.pid}) connection lost: {error}"
            ) from error
        if "error" in reply:
            raise RolloutServerError(f"vLLM rollout server refused {message['op']}: {reply['error']}")
        return reply

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left:
            chunk = self.conn.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("the server closed the socket")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def sample(self, batch: PromptBatch) -> Samples:
        """The server's answers, laid out exactly as `rollout.sample` lays out `generate`'s."""
        gen, tokenizer = self.generation, self.processor.tokenizer
        texts = [render_prompt(self.processor, q) for q in batch.questions]
        prompts = []
        for image, text in zip(batch.images, texts, strict=True):
            # One image token per image, as the tokenizer alone writes it: vLLM expands it to the
            # image's feature tokens itself, and would expand an already expanded run again.
            ids = tokenizer(text)["input_ids"]
            png = io.BytesIO()
            image.convert("RGB").save(png, format="PNG")
            prompts.append({"token_ids": list(ids), "image_png": base64.b64encode(png.getvalue()).decode()})
        end_ids = self.family.end_token_ids(tokenizer)
        reply = self._request(
            {
                "op": "generate",
                "prompts": prompts,
                "max_new_tokens": gen.max_new_tokens,
                "temperature": gen.temperature,
                "top_p": gen.top_p,
                "stop_token_ids": end_ids,
                "bad_token_ids": self.family.suppressed_token_ids(tokenizer),
            }
        )
        outputs = reply["outputs"]
        width = max(len(out["token_ids"]) for out in outputs)
        generated = torch.full((len(outputs), width), tokenizer.pad_token_id, dtype=torch.long)
        log_probs = torch.zeros(len(outputs), width)
        for row, out in enumerate(outputs):
            generated[row, : len(out["token_ids"])] = torch.tensor(out["token_ids"], dtype=torch.long)
            log_probs[row, : len(out["log_probs"])] = torch.tensor(out["log_probs"])
        mask = response_mask(generated, end_ids)
        generated = generated.masked_fill(mask == 0, tokenizer.pad_token_id).to(self.device)
        padded = self.processor(
            images=batch.images, text=texts, padding=True, padding_side="left", return_tensors="pt"
        ).to(self.device)
        prompt_inputs = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in padded.items()}
        mask = mask.to(self.device)
        return Samples(
            self.family.sequence_inputs(prompt_inputs, generated, mask),
            prompt_inputs["input_ids"].shape[1],
            mask,
            self.family,
            (log_probs.to(self.device) * mask) if self.with_log_probs else None,
        )

    def update_weights(self, model: torch.nn.Module) -> None:
        """Write `model`'s weights under vLLM's names and have the server load them in place."""
        folder = Path(tempfile.mkdtemp(prefix="weights-", dir=self.workdir))
        try:
            save_file(vllm_state_dict(model), folder / "model.safetensors")
            self._request({"op": "reload", "dir": str(folder)})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        """Stop the server (asking first, then killing it) and remove the temporary folder."""
        if self.process.poll() is None:
            try:
                if hasattr(self, "conn"):
                    self._request({"op": "shutdown"})
                self.process.wait(timeout=30)
            except (RolloutServerError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
