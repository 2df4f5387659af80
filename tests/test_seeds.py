"""The multi-seed check: its criteria by hand, the table it prints, and one tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safe_rlhf_v.config import config_from_dict
from safe_rlhf_v.seeds import COLUMNS, SeedResult, criteria, format_table, run_seeds

GOOD = {
    "initial_truth_harmful_share": 0.12,
    "reward-only/trained_truth_harmful_share": 0.30,
    "safe-rlhf-v/trained_truth_harmful_share": 0.05,
    "safe-rlhf-v/truth_win_rate_helpfulness": 0.61,
    "safe-rlhf-v/trained_truth_off_distribution_share": 0.04,
    "safe-rlhf-v/final_J_C": -6.5,
}


def test_criteria_by_hand() -> None:
    assert all(criteria(GOOD, threshold=-6.0).values())
    for key, value, failed in (
        ("safe-rlhf-v/trained_truth_harmful_share", 0.12, "safer than base"),  # equal is not lower
        ("reward-only/trained_truth_harmful_share", 0.01, "safer than reward-only"),
        ("safe-rlhf-v/truth_win_rate_helpfulness", 0.5, "more helpful than base"),
        ("safe-rlhf-v/trained_truth_off_distribution_share", 0.11, "on distribution"),
        ("safe-rlhf-v/final_J_C", -5.9, "within budget"),
    ):
        checks = criteria(GOOD | {key: value}, threshold=-6.0)
        assert [name for name, ok in checks.items() if not ok] == [failed], key


def test_table_shows_every_seed_the_spread_and_each_verdict() -> None:
    results = [
        SeedResult(0, GOOD, criteria(GOOD, -6.0)),
        SeedResult(
            1, GOOD | {"safe-rlhf-v/final_J_C": -5.5}, criteria(GOOD | {"safe-rlhf-v/final_J_C": -5.5}, -6.0)
        ),
    ]
    table = format_table(results).splitlines()
    assert table[0].split() == ["seed", "0", "seed", "1", "mean", "±", "sd"]
    assert "-6.500    -5.500    -6.000 ± 0.707" in next(line for line in table if "final J_C" in line)
    assert next(line for line in table if line.startswith("within budget")).split()[-2:] == ["yes", "NO"]
    assert table[-1] == "every criterion at every seed: NO"


@pytest.mark.slow
def test_a_tiny_run_trains_every_variant_at_every_seed(
    tmp_path: Path, demo_data: Path, tiny_model: Path
) -> None:
    quick = {"max_length": 192, "train": {"epochs": 1, "max_steps": 2, "per_device_batch_size": 8}}
    ppo_train = {"epochs": 1, "max_steps": 2, "per_device_batch_size": 4, "precision": "fp32"}
    cfg = config_from_dict(
        {
            "work_dir": str(tmp_path / "work"),
            "data": {"uri": str(demo_data)},
            "base_model": str(tiny_model),
            "validate_data": {"min_rows": {"train": 10, "evaluation": 10}},
            "train_reward": quick,
            "train_cost": quick,
            "train_ppo_lag": {
                "actor": ppo_train,
                "critic": ppo_train,
                "prompt_batch_size": 4,
                "generation": {"max_new_tokens": 8},
                "eval_prompts": 8,
            },
            "ablations": ["reward-only"],
            "evaluate": {"ground_truth": True},
        }
    )
    logged: list[str] = []
    results = run_seeds(cfg, [0, 1], tmp_path / "seeds", log=logged.append)
    assert [r.seed for r in results] == [0, 1]
    assert logged[1:] == [f"seeds: seed {s}, {v}" for s in (0, 1) for v in ("safe-rlhf-v", "reward-only")]
    rates = [r.figures["safe-rlhf-v/trained_truth_helpful_rate"] for r in results]
    assert all(0.0 <= value <= 3.0 for value in rates)
    assert all(set(r.figures) >= {key for _, key in COLUMNS} for r in results)
    saved = json.loads((tmp_path / "seeds" / "seeds.json").read_text())
    assert [entry["seed"] for entry in saved] == [0, 1] and set(saved[0]["checks"]) == set(results[0].checks)
    blind = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"ground_truth": False})})
    with pytest.raises(ValueError, match=r"evaluate\.ground_truth=true"):
        run_seeds(blind, [0, 1], tmp_path / "other")
