"""CUDA smoke test for `gpu_check.sh`: can torch use the GPU at all, and how fast does it multiply?

Prints one JSON line: torch and CUDA versions, the device's name, memory and compute capability,
whether bf16 is supported, and the measured bf16 and fp32 (TF32 off) matrix-product rates on square
products, so a later benchmark's MFU can be read against what this device really reaches.
It exits non-zero, with the reason, when torch sees no CUDA device.

Run: `.venv/bin/python benchmarks/cuda_smoke.py [--size 8192] [--repeats 20]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def matmul_tflops(size: int, dtype: torch.dtype, repeats: int) -> float:
    """TFLOP/s of `repeats` (size x size) @ (size x size) products, after one warm-up product."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__} (CUDA build {torch.version.cuda})")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 figure is plain fp32
    props = torch.cuda.get_device_properties(0)
    report = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": props.name,
        "devices": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "bf16_tflops": round(matmul_tflops(args.size, torch.bfloat16, args.repeats), 1),
        "fp32_tflops": round(matmul_tflops(args.size, torch.float32, args.repeats), 1),
    }
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
