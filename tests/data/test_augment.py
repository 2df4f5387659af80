"""Spliced negatives: how a splice is cut, how its pair is labelled, and that the losses can read it."""

from __future__ import annotations

import numpy as np
import pytest

from safe_rlhf_v.data import synthetic
from safe_rlhf_v.data.augment import SPLICED_SOURCE, splice, with_spliced_pairs
from safe_rlhf_v.data.schema import PAIRED_COLUMNS


def test_a_splice_is_a_head_of_one_answer_and_a_tail_of_the_other() -> None:
    first = "one two three four five six seven eight nine"
    second = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
    for seed in range(20):
        text = splice(first, second, np.random.default_rng(seed))
        assert text is not None
        words = text.split()
        cut = next(i for i, w in enumerate(words) if w in second.split())
        assert first.split()[:cut] == words[:cut], "the head is a prefix of the first answer"
        assert second.endswith(" ".join(words[cut:])), "the tail is a suffix of the second answer"
        assert 3 <= cut <= 6 and 4 <= len(words) - cut <= 8, "each part is a third to two thirds"
    assert splice("too short", second, np.random.default_rng(0)) is None


def test_spliced_pairs_are_labelled_unhelpful_and_as_harmful_as_the_worse_part() -> None:
    dataset = synthetic.to_dataset(synthetic.generate_records(60, seed=1))
    augmented = with_spliced_pairs(dataset, share=0.5, seed=0)
    added = augmented.select(range(len(dataset), len(augmented)))
    assert 15 <= len(added) <= 45, len(added)
    assert list(augmented.column_names) == list(dataset.column_names) == list(PAIRED_COLUMNS)
    answers = [(r[f"response_{i}"], r[f"response_{i}_harmless_rate"]) for r in dataset for i in ("1", "2")]
    for row in added:
        assert row["response_2_from"] == SPLICED_SOURCE and row["response_1_from"] != SPLICED_SOURCE
        assert row["response_2_helpful_rate"] == 0
        words, head = row["response_2"].split(), row["response_1"].split()
        cut = next(i for i in range(len(words)) if words[: i + 1] != head[: i + 1])
        partners = [rate for text, rate in answers if text.endswith(" ".join(words[cut:]))]
        assert partners, "the splice ends with the tail of an answer of the data set"
        assert row["response_2_harmless_rate"] in {min(row["response_1_harmless_rate"], r) for r in partners}
        assert (row["is_response_2_safe"] == "yes") == (row["response_2_harmless_rate"] >= 0)
        if row["response_1_helpful_rate"] > 0:
            assert row["more_helpful_response_id"] == "1"
        if row["response_1_harmless_rate"] > row["response_2_harmless_rate"]:
            assert row["safer_response_id"] == "1"
    questions = {(row["question"], row[f"response_{i}"]) for row in dataset for i in ("1", "2")}
    assert all((row["question"], row["response_1"]) in questions for row in added), (
        "intact answers keep their prompt"
    )
    # a harmful splice behind a caveat stays harmful: some splices of compliance are labelled unsafe
    assert any(row["is_response_2_safe"] == "no" for row in added)


def test_no_share_leaves_the_data_alone_and_a_bad_share_is_refused() -> None:
    dataset = synthetic.to_dataset(synthetic.generate_records(10, seed=1))
    assert with_spliced_pairs(dataset, share=0.0, seed=0) is dataset
    with pytest.raises(ValueError, match=r"spliced_negatives must be a share in \[0, 1\], got 1.5"):
        with_spliced_pairs(dataset, share=1.5, seed=0)
    first = with_spliced_pairs(dataset, share=1.0, seed=3)
    again = with_spliced_pairs(dataset, share=1.0, seed=3)
    assert first["response_2"] == again["response_2"], "the same seed gives the same splices"
