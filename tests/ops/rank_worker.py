"""Stand-in for a stage's CLI command under torchrun in test_launch.py (not a test itself).

It takes `--out DIR` like a stage and joins the process group exactly as every trainer does
(`train.distributed.init_distributed`, from the variables torchrun sets), all-reduces one value and
writes what its rank saw to `rank<R>.json`. A real stage command (`-m safe_rlhf_v.cli train-reward
--config ... --data ... --out ...`) runs the same launcher and the same `init_distributed`; it only
does more work afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from safe_rlhf_v.train.distributed import all_reduce_mean, init_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    info = init_distributed()
    mean = all_reduce_mean(torch.tensor(float(info.rank + 1)))
    report = {
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "backend": info.backend,
        "mean": mean,
        "master_addr": os.environ["MASTER_ADDR"],
    }
    Path(args.out, f"rank{info.rank}.json").write_text(json.dumps(report), encoding="utf-8")
    print(f"rank {info.rank} of {info.world_size}: mean {mean}", flush=True)


if __name__ == "__main__":
    main()
