"""The vLLM rollout server: samples PPO answers for `VLLMEngine` from its own process and venv.

vLLM's CPU build pins torch 2.13.0+cpu and transformers <5.20, which clash with the training lock,
so it lives in `.venv-vllm` (`make vllm-env`) and this script is run by that venv's Python. It
therefore imports only vllm, torch, safetensors, PIL (vLLM's own dependencies) and the standard
library, never `safe_rlhf_v`, whose dependencies are not in that venv.

It listens on a Unix socket for one client (the trainer). Each message, either way, is a 4-byte
big-endian length and that many bytes of UTF-8 JSON: no pickle ever crosses the socket, so a peer
can make it run nothing. Requests:

- `{"op": "generate", "prompts": [{"token_ids": [...], "image_png": base64}], "max_new_tokens",
  "temperature", "top_p", "stop_token_ids", "bad_token_ids"}` -> `{"outputs": [{"token_ids",
  "log_probs"}]}`: one answer per prompt, with each sampled token's log-prob under the raw logits
  divided by the policy's temperature (`policy_temperature`), what the trainer's forward computes.
- `{"op": "reload", "dir": path}` -> `{"ok": true, "seconds"}`: load every `*.safetensors` file in
  `dir` (the trainer's new actor weights, already under vLLM's names) into the running engine,
  then drop the prefix and encoder caches, which hold the old weights' KV entries and image
  encodings (a stale encoder entry kills vLLM with "Encoder cache miss").
- `{"op": "shutdown"}` -> `{"ok": true}`, then the server exits.

An error inside a request is answered `{"error": "..."}` and the server keeps serving.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

HEADER = struct.Struct(">I")


SITE = Path(__file__).resolve().parent / "vllm_site"


def _prepare_environment() -> None:
    """In-process vLLM on the CPU, and `vllm_site/sitecustomize.py` (why: see there) run in this
    process and, through PYTHONPATH, in every subprocess vLLM starts."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(SITE))
    import sitecustomize  # noqa: F401  (this folder's, unless the interpreter already ran it)


def read_message(conn: socket.socket) -> dict[str, Any] | None:
    """One length-prefixed JSON message, or None when the peer closed the connection."""
    header = _read_exactly(conn, HEADER.size)
    if header is None:
        return None
    body = _read_exactly(conn, HEADER.unpack(header)[0])
    if body is None:
        return None
    return json.loads(body)


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def write_message(conn: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode()
    conn.sendall(HEADER.pack(len(body)) + body)


class Server:
    """One vLLM engine in this process (in-process mode: no engine-core subprocess to leak)."""

    def __init__(self, model: str, max_model_len: int | None, seed: int, kv_cache_mib: int) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=model,
            dtype="float32",
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=True,
            # On the CPU backend this fraction of the host's memory is reserved up front (and
            # start-up fails when that much is not free); the KV cache gets an explicit size instead.
            gpu_memory_utilization=0.05,
            kv_cache_memory_bytes=kv_cache_mib << 20,
            # Raw logits: the server normalises them at the policy's temperature itself, so the
            # log-probs are the policy's, not those of the top-p-truncated sampling distribution.
            logprobs_mode="raw_logits",
            max_logprobs=-1,
        )

    def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        import torch
        from PIL import Image
        from vllm import SamplingParams, TokensPrompt

        temperature = float(request["temperature"])
        policy_temperature = temperature if temperature > 0 else 1.0
        params = SamplingParams(
            n=1,
            temperature=temperature,
            top_p=float(request["top_p"]) if temperature > 0 else 1.0,
            max_tokens=int(request["max_new_tokens"]),
            stop_token_ids=list(request["stop_token_ids"]),
            logit_bias={int(i): -100.0 for i in request["bad_token_ids"]} or None,
            logprobs=-1,
            detokenize=False,
        )
        prompts = []
        for prompt in request["prompts"]:
            image = Image.open(io.BytesIO(base64.b64decode(prompt["image_png"]))).convert("RGB")
            prompts.append(
                TokensPrompt(prompt_token_ids=prompt["token_ids"], multi_modal_data={"image": image})
            )
        outputs = []
        for result in self.llm.generate(prompts, params, use_tqdm=False):
            completion = result.outputs[0]
            log_probs = []
            for token, step in zip(completion.token_ids, completion.logprobs or [], strict=True):
                ids = torch.tensor(list(step.keys()))
                logits = torch.tensor([entry.logprob for entry in step.values()], dtype=torch.float64)
                normalised = torch.log_softmax(logits / policy_temperature, dim=0)
                log_probs.append(float(normalised[(ids == token).nonzero()[0, 0]]))
            outputs.append({"token_ids": list(completion.token_ids), "log_probs": log_probs})
        return {"outputs": outputs}

    def reload(self, request: dict[str, Any]) -> dict[str, Any]:
        from safetensors.torch import load_file

        start = time.perf_counter()
        weights: list[tuple[str, Any]] = []
        for shard in sorted(Path(request["dir"]).glob("*.safetensors")):
            weights.extend(load_file(shard).items())
        if not weights:
            raise ValueError(f"no *.safetensors file in {request['dir']}")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()  # the processed-image cache of the front end
        self.llm.llm_engine.reset_encoder_cache()  # the image encodings (old weights)
        return {"ok": True, "seconds": time.perf_counter() - start}

    def serve(self, path: str) -> None:
        """Answer one client's requests until it asks for shutdown or goes away."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path + ".tmp")
        listener.listen(1)
        os.replace(path + ".tmp", path)  # the path appears only once the socket accepts connections
        conn, _ = listener.accept()
        with conn:
            while (request := read_message(conn)) is not None:
                op = request.get("op")
                if op == "shutdown":
                    write_message(conn, {"ok": True})
                    return
                try:
                    if op == "generate":
                        reply = self.generate(request)
                    elif op == "reload":
                        reply = self.reload(request)
                    else:
                        reply = {"error": f"unknown op {op!r}"}
                except Exception as error:  # answered, so the trainer sees the cause and the server lives
                    reply = {"error": f"{type(error).__name__}: {error}"}
                write_message(conn, reply)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (vLLM's weight names, safetensors)")
    parser.add_argument("--socket", help="Unix socket path to listen on")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model config's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-mib", type=int, default=256, help="KV cache size in MiB")
    parser.add_argument("--check", action="store_true", help="only check that vLLM imports, then exit")
    args = parser.parse_args(argv)
    _prepare_environment()
    if args.check:
        import vllm

        print(f"vllm {vllm.__version__} imports")
        return 0
    if not args.model or not args.socket:
        parser.error("--model and --socket are required unless --check")
    Server(args.model, args.max_model_len, args.seed, args.kv_cache_mib).serve(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
