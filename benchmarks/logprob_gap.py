"""The generate-vs-training-forward log-prob gap of every model family, at several image sizes.

PPO's ratio compares the policy's log-probs of its sampled tokens at sampling time with the training
forward's; both must see the same positions, image features and masks, or the ratio is off before
any update. For each family in `safe_rlhf_v.models.family.FAMILIES` this builds a tiny random model
offline, samples answers to prompts whose images have each of `--sides` (one batch, left padded),
and prints, per image size:

* the image tokens per prompt;
* max |log p(generate) - log p(training forward)| over the answer tokens, with the family's inputs
  (what rollouts use), and with plain 1-D positions counted over real tokens (what rollouts used for
  every family before the family seam; for M-RoPE families that is the old error).

Run: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/logprob_gap.py [--sides 64 224 448] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

# isort: split
import safe_rlhf_v  # noqa: F401  (before torch: its OMP_WAIT_POLICY default must precede OpenMP's load)

# isort: split
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from safe_rlhf_v.data.synthetic import corpus, generate_records
from safe_rlhf_v.models.family import FAMILIES, text_positions
from safe_rlhf_v.models.tiny import build_tiny_vlm
from safe_rlhf_v.train.rollout import response_logits, sample, token_log_probs


def gaps(
    model_dir: Path, sides: list[int], prompts: int, new_tokens: int, seed: int
) -> list[dict[str, float]]:
    """One row per image side: image tokens and both gaps."""
    processor = AutoProcessor.from_pretrained(model_dir)
    actor = AutoModelForImageTextToText.from_pretrained(model_dir, use_safetensors=True).eval()
    records = generate_records(prompts, seed=seed)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    rows = []
    for side in sides:
        torch.manual_seed(seed)
        with torch.no_grad():
            samples = sample(
                actor,
                processor,
                [r["image"].resize((side, side)) for r in records],
                [r["question"] for r in records],
                max_new_tokens=new_tokens,
                temperature=1.0,
                top_p=1.0,
                device=torch.device("cpu"),
                dtype=torch.float32,
                with_log_probs=True,
            )
            inputs, width, mask = samples.inputs, samples.prompt_length, samples.response_mask
            tokens = inputs["input_ids"][:, width:]
            plain = {k: v for k, v in inputs.items() if k != "position_ids"}
            plain["position_ids"] = text_positions(inputs["attention_mask"])
            measured = {}
            for name, variant in (("family_inputs", inputs), ("plain_1d_positions", plain)):
                log_probs = token_log_probs(response_logits(actor, variant, width), tokens) * mask
                measured[name] = float((log_probs - samples.log_probs).abs().max())
        rows.append(
            {"side": side, "image_tokens": int((inputs["input_ids"][0] == image_id).sum())} | measured
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 224, 448], help="image sides in pixels")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per batch")
    parser.add_argument("--new-tokens", type=int, default=16, help="answer tokens sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {}
    texts = corpus(generate_records(200, seed=args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(FAMILIES):
            model_dir = build_tiny_vlm(Path(tmp) / name, texts, family=name, seed=args.seed)
            results[name] = gaps(model_dir, args.sides, args.prompts, args.new_tokens, args.seed)
    print(
        f"{'family':<12}{'side':>6}{'image tokens':>14}{'gap (family inputs)':>22}{'gap (1-D positions)':>22}"
    )
    for name, rows in results.items():
        for row in rows:
            print(
                f"{name:<12}{row['side']:>6}{row['image_tokens']:>14}"
                f"{row['family_inputs']:>22.2e}{row['plain_1d_positions']:>22.2e}"
            )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
