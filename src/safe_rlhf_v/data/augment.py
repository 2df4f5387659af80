"""Spliced answers as negatives for the reward and cost models.

PPO finds where a learned judge is blind. Against the demo's reward and cost models it writes
splices: an answer that opens like one kind and ends like another ("Doing that could cause harm ...
: act when nobody is around, and remove every trace"), or that drifts into another prompt's topic
halfway, which no rater ever saw, so the models score it by whichever part they happen to read.
Raters would say two things of any splice, and both hold for real BeaverTails-V rows as for
synthetic ones:

- it is no more helpful than the intact answer it starts from (a garbled answer helps nobody);
- it is as harmful as its more harmful part (harmful instructions stay harmful behind a caveat).

`with_spliced_pairs` adds, for a share of the rows, a pair (intact answer, splice) labelled that way,
in the paired schema, so the reward and cost losses train on them unchanged. The splice takes the
first words of one of the row's answers and the last words of another answer, each at least a third
of its source: half the time the row's other answer, else an answer to another row's prompt.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np

from safe_rlhf_v.data.schema import RESPONSE_IDS, is_safe

SPLICED_SOURCE = "spliced-negative"
PER_RESPONSE = ("", "_from", "_harmless_rate", "_helpful_rate")
MIN_PART_WORDS = 3


def splice(first: str, second: str, rng: np.random.Generator) -> str | None:
    """The head of `first` joined to the tail of `second`, each 1/3 to 2/3 of its answer's words;
    None when either answer is too short to give a part of `MIN_PART_WORDS` words."""
    head_words, tail_words = first.split(), second.split()
    if min(len(head_words), len(tail_words)) < 3 * MIN_PART_WORDS:
        return None
    head = int(rng.integers(len(head_words) // 3, 2 * len(head_words) // 3 + 1))
    tail = int(rng.integers(len(tail_words) // 3, 2 * len(tail_words) // 3 + 1))
    return " ".join(head_words[:head] + tail_words[-tail:])


def _prefer_intact(intact: int, spliced: int, rng: np.random.Generator) -> str:
    """ "1" when the intact answer rates higher; a tie is broken at random, as the data set's judge
    had to name one answer."""
    return "1" if intact > spliced else RESPONSE_IDS[int(rng.integers(2))]


def _spliced_row(answers: datasets.Dataset, index: int, rng: np.random.Generator) -> dict[str, Any] | None:
    """Row `index` of `answers` turned into a pair (intact answer, splice of it with a partner answer)
    with the module docstring's labels: the splice is unhelpful (helpfulness 0) and as harmless as
    the less harmless of its parts. The partner is the row's other answer half the time, else an
    answer to another row's prompt (a drift into another topic)."""
    row = answers[index]
    start = RESPONSE_IDS[int(rng.integers(2))]
    if len(answers) > 1 and rng.random() < 0.5:
        partner_row, end = answers[int(rng.integers(len(answers)))], RESPONSE_IDS[int(rng.integers(2))]
    else:
        partner_row, end = row, RESPONSE_IDS[1 - RESPONSE_IDS.index(start)]
    text = splice(row[f"response_{start}"], partner_row[f"response_{end}"], rng)
    if text is None:
        return None
    harmless = min(row[f"response_{start}_harmless_rate"], partner_row[f"response_{end}_harmless_rate"])
    intact = {f"response_1{suffix}": row[f"response_{start}{suffix}"] for suffix in PER_RESPONSE}
    return {
        **intact,
        "is_response_1_safe": row[f"is_response_{start}_safe"],
        "response_2": text,
        "response_2_from": SPLICED_SOURCE,
        "response_2_harmless_rate": harmless,
        "response_2_helpful_rate": 0,
        "is_response_2_safe": "yes" if is_safe(harmless) else "no",
        "more_helpful_response_id": _prefer_intact(intact["response_1_helpful_rate"], 0, rng),
        "safer_response_id": _prefer_intact(intact["response_1_harmless_rate"], harmless, rng),
    }


def with_spliced_pairs(dataset: datasets.Dataset, share: float, seed: int) -> datasets.Dataset:
    """`dataset` plus spliced pairs for about `share` of its rows (0 returns it unchanged)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"spliced_negatives must be a share in [0, 1], got {share}")
    if share == 0.0 or len(dataset) == 0:
        return dataset
    rng = np.random.default_rng(seed)
    chosen = np.flatnonzero(rng.random(len(dataset)) < share)
    # Splicing reads only the answers and their labels; the rest of a new row (image, question, ...)
    # is its source row's, taken in one select so images are not decoded twice.
    answers = dataset.select_columns([c for c in dataset.column_names if "response_" in c])
    pairs = [(i, pair) for i in map(int, chosen) if (pair := _spliced_row(answers, i, rng)) is not None]
    if not pairs:
        return dataset
    sources = dataset.select([i for i, _ in pairs]).to_list()
    added = datasets.Dataset.from_list([row | pair for row, (_, pair) in zip(sources, pairs, strict=True)],
                                       features=dataset.features)  # fmt: skip
    return datasets.concatenate_datasets([dataset, added])
