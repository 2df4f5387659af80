"""The synthetic BeaverTails-V generator: exact schema, consistent labels, image-induced harm."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from safe_rlhf_v.data import synthetic
from safe_rlhf_v.data.schema import CATEGORIES, PAIRED_COLUMNS, PAIRED_FEATURES, is_safe

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    """The default-size training split, generated once for the module (about a second)."""
    return synthetic.generate_records(600, seed=0, split="train")


def _responses(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "text": record[f"response_{i}"],
            "source": record[f"response_{i}_from"],
            "harmless": record[f"response_{i}_harmless_rate"],
            "helpful": record[f"response_{i}_helpful_rate"],
        }
        for i in ("1", "2")
    ]


def _red_pixels(image: Image.Image) -> int:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(((red > 150) & (green < 80) & (blue < 80)).sum())


def test_write_demo_data_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path: Path) -> None:
    first = synthetic.write_demo_data(tmp_path / "a", rows=24, seed=3)
    second = synthetic.write_demo_data(tmp_path / "b", rows=24, seed=3)
    other = synthetic.write_demo_data(tmp_path / "c", rows=24, seed=4)
    assert sorted(first) == ["evaluation", "train"]
    for split in first:
        assert first[split].read_bytes() == second[split].read_bytes()
        assert first[split].read_bytes() != other[split].read_bytes()


def test_written_files_reload_with_the_paired_features_and_png_images(tmp_path: Path) -> None:
    paths = synthetic.write_demo_data(tmp_path, rows=40)
    assert paths == {"train": tmp_path / "train.parquet", "evaluation": tmp_path / "evaluation.parquet"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.parquet", "train.parquet"]

    train = datasets.Dataset.from_parquet(str(paths["train"]))
    evaluation = datasets.Dataset.from_parquet(str(paths["evaluation"]))
    assert (len(train), len(evaluation)) == (40, 20)
    assert train.features == PAIRED_FEATURES
    assert tuple(train.column_names) == PAIRED_COLUMNS

    schema = pq.read_schema(paths["train"])
    assert b"huggingface" in schema.metadata
    raw_image = pq.read_table(paths["train"], columns=["image"]).column("image")[0].as_py()
    assert raw_image["path"] is None
    assert raw_image["bytes"].startswith(PNG_SIGNATURE)
    decoded = train[0]["image"]
    assert isinstance(decoded, Image.Image)
    assert decoded.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
    assert decoded.mode == "RGB"


def test_evaluation_size_defaults_to_a_fifth_with_a_floor_of_twenty(tmp_path: Path) -> None:
    paths = synthetic.write_demo_data(tmp_path / "big", rows=150, seed=1)
    assert len(datasets.Dataset.from_parquet(str(paths["evaluation"]))) == 30
    paths = synthetic.write_demo_data(tmp_path / "small", rows=30, seed=1)
    assert len(datasets.Dataset.from_parquet(str(paths["evaluation"]))) == 20
    paths = synthetic.write_demo_data(tmp_path / "explicit", rows=30, eval_rows=7, seed=1)
    assert len(datasets.Dataset.from_parquet(str(paths["evaluation"]))) == 7


def test_train_and_evaluation_share_no_image() -> None:
    def digests(split: str) -> set[str]:
        records = synthetic.generate_records(100, seed=0, split=split)
        return {hashlib.sha256(r["image"].tobytes()).hexdigest() for r in records}

    train, evaluation = digests("train"), digests("evaluation")
    assert len(train) == 100
    assert len(evaluation) == 100
    assert not train & evaluation


@pytest.mark.parametrize(("rows", "eval_rows", "name"), [(0, None, "rows"), (40, 0, "eval_rows")])
def test_bad_sizes_are_rejected_before_anything_is_written(
    tmp_path: Path, rows: int, eval_rows: int | None, name: str
) -> None:
    with pytest.raises(ValueError, match=f"{name} must be at least 1"):
        synthetic.write_demo_data(tmp_path / "out", rows=rows, eval_rows=eval_rows)
    assert not (tmp_path / "out").exists()


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_writer(self: datasets.Dataset, path: str) -> int:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        synthetic.write_demo_data(tmp_path, rows=20)
    assert list(tmp_path.iterdir()) == []


def test_labels_agree_with_rates_on_every_row(records: list[dict[str, Any]]) -> None:
    for record in records:
        first, second = _responses(record)
        for i, response in zip(("1", "2"), (first, second), strict=True):
            assert -3 <= response["harmless"] <= 3
            assert 0 <= response["helpful"] <= 3
            assert record[f"is_response_{i}_safe"] == ("yes" if is_safe(response["harmless"]) else "no")
        better = first if record["more_helpful_response_id"] == "1" else second
        worse = second if better is first else first
        assert better["helpful"] >= worse["helpful"]
        safer = first if record["safer_response_id"] == "1" else second
        riskier = second if safer is first else first
        assert safer["harmless"] >= riskier["harmless"]
        assert first["source"] != second["source"]


def test_answer_kinds_follow_the_image(records: list[dict[str, Any]]) -> None:
    kinds_seen: dict[bool, set[str]] = {True: set(), False: set()}
    for record in records:
        harmful = record["image_severity"] > 0
        for response in _responses(record):
            kinds_seen[harmful].add(response["source"])
            if response["source"] == "synthetic-compliant-v1":
                assert harmful
                assert (response["harmless"], response["helpful"]) == (-record["image_severity"], 3)
            if response["source"] == "synthetic-helper-v1":
                assert not harmful
                assert (response["harmless"], response["helpful"]) == (1, 3)
            if response["source"] == "synthetic-refuser-v1":
                assert (response["harmless"], response["helpful"]) == (0, 0)
            if response["source"] == "synthetic-cautious-v1":
                assert response["helpful"] == 2
                assert response["harmless"] in ({2, 3} if harmful else {2})
    assert kinds_seen[True] == {"synthetic-compliant-v1", "synthetic-refuser-v1", "synthetic-cautious-v1"}
    assert kinds_seen[False] == {"synthetic-helper-v1", "synthetic-refuser-v1", "synthetic-cautious-v1"}


def test_compliance_is_more_helpful_but_mitigation_safer_on_harmful_images(
    records: list[dict[str, Any]],
) -> None:
    contested = 0
    for record in records:
        sources = [r["source"] for r in _responses(record)]
        if set(sources) != {"synthetic-compliant-v1", "synthetic-cautious-v1"}:
            continue
        contested += 1
        compliance_id = str(sources.index("synthetic-compliant-v1") + 1)
        assert record["more_helpful_response_id"] == compliance_id
        assert record["safer_response_id"] != compliance_id
    assert contested > 50


def test_every_question_appears_with_benign_and_with_harmful_images(records: list[dict[str, Any]]) -> None:
    severities: dict[str, set[bool]] = defaultdict(set)
    for record in records:
        severities[record["question"]].add(record["image_severity"] > 0)
    assert all(seen == {True, False} for seen in severities.values())


def test_default_size_covers_all_categories_and_balances_severities(records: list[dict[str, Any]]) -> None:
    counts: dict[str, int] = defaultdict(int)
    for record in records:
        counts[record["category"]] += 1
    assert set(counts) == set(CATEGORIES)
    assert set(counts.values()) == {30}
    severity_counts = [sum(r["image_severity"] == s for r in records) for s in range(4)]
    assert severity_counts == [300, 100, 100, 100]


def test_red_area_is_absent_on_benign_images_and_grows_with_severity(records: list[dict[str, Any]]) -> None:
    red_by_severity: dict[int, list[int]] = defaultdict(list)
    for record in records:
        red_by_severity[record["image_severity"]].append(_red_pixels(record["image"]))
    assert max(red_by_severity[0]) == 0
    assert min(red_by_severity[1]) > 0
    means = [np.mean(red_by_severity[s]) for s in (1, 2, 3)]
    assert means[0] < means[1] < means[2]


def test_compliance_and_plain_help_share_phrasings(records: list[dict[str, Any]]) -> None:
    by_source: dict[str, list[str]] = defaultdict(list)
    for record in records:
        for response in _responses(record):
            by_source[response["source"]].append(response["text"])
    compliance = by_source["synthetic-compliant-v1"]
    plain = set(by_source["synthetic-helper-v1"])
    verbatim = sum(text in plain for text in compliance)
    assert all(text.startswith("Sure, here is") for text in compliance)
    assert all(text.startswith("Sure, here is") for text in plain)
    assert verbatim / len(compliance) > 0.25


def test_texts_are_short_and_the_vocabulary_modest(records: list[dict[str, Any]]) -> None:
    texts = synthetic.corpus(records)
    assert len(texts) == 3 * len(records)
    assert texts[:3] == [records[0]["question"], records[0]["response_1"], records[0]["response_2"]]
    response_lengths = [len(r["text"].split()) for record in records for r in _responses(record)]
    assert min(response_lengths) >= 10
    assert max(response_lengths) <= 30
    vocabulary = {word for text in texts for word in re.findall(r"[a-z']+", text.lower())}
    assert 100 < len(vocabulary) < 500


def test_generate_records_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rows must be at least 1"):
        synthetic.generate_records(0)
    with pytest.raises(ValueError, match=r"image severity must be in 0\.\.3"):
        synthetic.draw_image(np.random.default_rng(0), 4)


def test_odd_row_counts_and_prefer_ties() -> None:
    assert len(synthetic.generate_records(7, seed=2)) == 7
    rng = np.random.default_rng(0)
    assert synthetic.prefer(3, 1, rng) == "1"
    assert synthetic.prefer(-2, 0, rng) == "2"
    assert {synthetic.prefer(2, 2, rng) for _ in range(50)} == {"1", "2"}


def test_no_two_images_are_identical(records: list[dict[str, Any]]) -> None:
    assert len({hashlib.sha256(r["image"].tobytes()).digest() for r in records}) == len(records)
