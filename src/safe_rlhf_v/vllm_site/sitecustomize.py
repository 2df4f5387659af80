"""Started in every Python process of the vLLM rollout server (the server puts this folder on
PYTHONPATH, so vLLM's own subprocesses, such as its model-registry inspection, run it too).

PyPI's torchvision 0.28.0 registers Python fake kernels for `torchvision::nms` and `qnms` at import;
beside torch 2.13.0+cpu its C library does not load, so those operators do not exist and the import
fails, and vLLM imports torchvision. Defining the two schemas (torchvision's own signatures) first
lets it import. This file imports only torch and the standard library: it runs in `.venv-vllm`.
"""

import contextlib

import torch

for _name in ("nms", "qnms"):
    # Already defined when a torchvision whose C library did load came first.
    with contextlib.suppress(RuntimeError):
        torch.library.define(
            f"torchvision::{_name}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
