"""Where and in what precision saved models run outside training (evaluation, the guardrail).

One rule for every inference role, so a 7B policy, its reward and cost models and the guard fit on
one GPU together: bf16 on CUDA (half the memory of fp32, and the precision they were trained in),
fp32 on CPUs (where bf16 buys no speed on most hosts and changes the numbers tests compare).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def best_device() -> str:
    """CUDA when a GPU is visible (in the cluster image), else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on GPUs, fp32 on CPUs."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def model_inputs(
    inputs: Mapping[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Processor outputs on `device`, floating ones (pixel values) cast to the model's `dtype`:
    processors emit fp32 images, which a bf16 vision tower would reject."""
    return {
        key: value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in inputs.items()
    }
