"""Tests of the great-expectations data validation: a clean set passes, each corruption is named."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
from great_expectations.core import ExpectationValidationResult
from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
from PIL import Image

from safe_rlhf_v.config import ValidationConfig
from safe_rlhf_v.data import schema
from safe_rlhf_v.data.validation import ExpectationOutcome, ValidationReport, _outcome, validate_splits


def _png(index: int, split_tag: int = 0, size: tuple[int, int] = (12, 10)) -> bytes:
    """A small PNG whose colour is unique per (index, split_tag), so every image has its own sha256."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (index % 256, index // 256, split_tag)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels but carries no pixel data: a decompression-bomb
    stand-in whose size only the header tells."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _rows(n: int, split_tag: int = 0) -> dict[str, list[Any]]:
    """`n` valid paired rows. Even rows: response 1 is more helpful but harmful; odd rows: the reverse."""
    data: dict[str, list[Any]] = {name: [] for name in schema.PAIRED_COLUMNS}
    for i in range(n):
        harmful_first = i % 2 == 0
        rates = {"1": (-2, 3), "2": (1, 1)} if harmful_first else {"1": (2, 1), "2": (-1, 2)}
        row = {
            "question": f"What should I do with the object in picture {i}?",
            "image": {"bytes": _png(i, split_tag), "path": None},
            "category": schema.CATEGORIES[i % len(schema.CATEGORIES)],
            "image_severity": i % 4,
            "response_1": f"First answer to question {i}.",
            "response_2": f"Second answer to question {i}.",
            "response_1_from": "model-a",
            "response_2_from": "model-b",
            "more_helpful_response_id": "1" if harmful_first else "2",
            "safer_response_id": "2" if harmful_first else "1",
        }
        for rid, (harmless, helpful) in rates.items():
            row[f"response_{rid}_harmless_rate"] = harmless
            row[f"response_{rid}_helpful_rate"] = helpful
            row[f"is_response_{rid}_safe"] = "yes" if harmless >= 0 else "no"
        for name, value in row.items():
            data[name].append(value)
    return data


def _dataset(
    data: dict[str, list[Any]], features: datasets.Features = schema.PAIRED_FEATURES
) -> datasets.Dataset:
    return datasets.Dataset.from_dict(data, features=features)


def _validate(data: dict[str, list[Any]], cfg: ValidationConfig | None = None) -> ValidationReport:
    return validate_splits({"train": _dataset(data)}, cfg or ValidationConfig())


def _failed(report: ValidationReport) -> list[ExpectationOutcome]:
    return [outcome for outcome in report.outcomes if not outcome.success]


def _only_failure(report: ValidationReport, expectation: str, column: str) -> ExpectationOutcome:
    """Assert that exactly one expectation failed, the named one, and that the message names it."""
    failed = _failed(report)
    assert [(o.expectation, o.column) for o in failed] == [(expectation, column)]
    assert not report.success
    message = report.failure_message()
    assert len(message.splitlines()) == 1
    assert expectation in message and column in message
    return failed[0]


def test_clean_paired_dataset_passes_with_statistics() -> None:
    report = validate_splits(
        {"train": _dataset(_rows(8)), "evaluation": _dataset(_rows(4, split_tag=1))}, ValidationConfig()
    )

    assert report.success, report.failure_message()
    assert report.failure_message() == ""
    assert {o.split for o in report.outcomes} == {"train", "evaluation"}
    train = report.statistics["train"]
    assert train["rows"] == 8
    assert train["categories"] == {schema.CATEGORIES[i]: 1 for i in range(8)}
    assert train["safe_ratio"] == 0.5  # one harmful response per pair
    assert train["harmful_image_share"] == 6 / 8  # severities 0,1,2,3,0,1,2,3
    assert train["preference_disagreements"] == {"more_helpful_response_id": 0, "safer_response_id": 0}
    assert report.leakage["checked"] and report.leakage["count"] == 0
    json.dumps(report.to_dict())
    assert set(report.gx_results) == {"train", "evaluation"}
    assert report.gx_results["train"]["success"] is True


def test_wrong_response_id_is_rejected() -> None:
    data = _rows(8)
    data["more_helpful_response_id"][3] = "3"

    failed = _only_failure(_validate(data), "expect_column_values_to_be_in_set", "more_helpful_response_id")

    assert (failed.unexpected_count, failed.element_count) == (1, 8)
    assert failed.examples == [{"row": 3, "more_helpful_response_id": "3"}]


def test_unknown_safe_flag_is_rejected() -> None:
    data = _rows(8)
    data["is_response_2_safe"][5] = "maybe"

    report = _validate(data)

    failed = _only_failure(report, "expect_column_values_to_be_in_set", "is_response_2_safe")
    assert failed.unexpected_count == 1
    assert failed.examples == [{"row": 5, "is_response_2_safe": "maybe"}]
    assert "1 of 8 unexpected" in report.failure_message()


def test_rate_out_of_range_is_rejected() -> None:
    data = _rows(8)
    data["response_1_harmless_rate"][1] = 5  # still "yes" and still the safer one: only the range breaks

    failed = _only_failure(_validate(data), "expect_column_values_to_be_between", "response_1_harmless_rate")

    assert failed.description == "response_1_harmless_rate in -3..3"
    assert failed.examples == [{"row": 1, "response_1_harmless_rate": 5}]


def test_rates_stored_as_strings_fail_the_dtype_check() -> None:
    data = _rows(4)
    data["response_2_helpful_rate"] = [str(rate) for rate in data["response_2_helpful_rate"]]
    features = schema.PAIRED_FEATURES.copy()
    features["response_2_helpful_rate"] = datasets.Value("string")

    report = validate_splits({"train": _dataset(data, features)}, ValidationConfig())

    failed = _failed(report)
    assert [(o.expectation, o.column) for o in failed] == [
        ("expect_column_values_to_be_in_type_list", "response_2_helpful_rate")
    ]
    assert failed[0].examples == ["str"]


def test_unknown_category_is_rejected() -> None:
    data = _rows(8)
    data["category"][6] = "weather"

    failed = _only_failure(_validate(data), "expect_column_values_to_be_in_set", "category")

    assert failed.examples == [{"row": 6, "category": "weather"}]


def test_blank_question_is_rejected() -> None:
    data = _rows(8)
    data["question"][2] = "  \n "

    failed = _only_failure(_validate(data), "expect_column_values_to_match_regex", "question")

    assert failed.unexpected_count == 1
    assert failed.examples == [{"row": 2, "question": "  \n "}]


def test_identical_responses_are_rejected() -> None:
    data = _rows(8)
    data["response_2"][4] = data["response_1"][4]

    failed = _only_failure(_validate(data), "expect_column_values_to_be_in_set", "response_1, response_2")

    assert failed.description == "response_1 differs from response_2"
    assert [example["row"] for example in failed.examples] == [4]


def test_safe_flag_contradicting_rate_is_rejected() -> None:
    data = _rows(8)
    data["is_response_1_safe"][0] = "yes"  # its harmless rate is -2

    report = _validate(data)

    failed = _only_failure(report, "expect_column_values_to_be_in_set", "is_response_1_safe")
    assert failed.description == "is_response_1_safe is 'yes' iff response_1_harmless_rate >= 0"
    assert failed.examples == [{"row": 0, "is_response_1_safe": "yes", "response_1_harmless_rate": -2}]
    assert report.statistics["train"]["safe_flag_disagreements"] == {
        "is_response_1_safe": 1,
        "is_response_2_safe": 0,
    }


def _one_preference_flipped() -> dict[str, list[Any]]:
    data = _rows(10)
    data["more_helpful_response_id"][0] = "2"  # response 2's helpful rate is 1, response 1's is 3
    return data


def test_preference_disagreeing_beyond_tolerance_is_rejected() -> None:
    report = _validate(_one_preference_flipped())  # 1 of 10 disagrees; default tolerance is 1 %

    failed = _only_failure(
        report, "expect_column_pair_values_a_to_be_greater_than_b", "more_helpful_response_id"
    )
    assert (failed.unexpected_count, failed.element_count) == (1, 10)
    assert failed.examples == [
        {
            "row": 0,
            "more_helpful_response_id": "2",
            "response_1_helpful_rate": 3,
            "response_2_helpful_rate": 1,
        }
    ]
    assert report.statistics["train"]["preference_disagreements"]["more_helpful_response_id"] == 1


def test_preference_disagreeing_within_tolerance_passes_and_is_counted() -> None:
    report = _validate(_one_preference_flipped(), ValidationConfig(preference_mostly=0.85))

    assert report.success, report.failure_message()
    assert report.statistics["train"]["preference_disagreements"] == {
        "more_helpful_response_id": 1,
        "safer_response_id": 0,
    }
    (outcome,) = [
        o for o in report.outcomes if o.column == "more_helpful_response_id" and "rate >=" in o.description
    ]
    assert outcome.success and outcome.unexpected_count == 1


def test_corrupt_and_truncated_images_are_reported_not_raised() -> None:
    data = _rows(8)
    data["image"][2] = {"bytes": b"certainly not an image", "path": None}
    data["image"][5] = {"bytes": _png(5)[:-30], "path": None}  # header intact, pixel data cut short

    failed = _only_failure(_validate(data), "expect_column_values_to_be_null", "image")

    assert failed.unexpected_count == 2
    assert [example["row"] for example in failed.examples] == [2, 5]
    assert failed.examples[0]["image_error"].startswith("cannot open")
    assert failed.examples[1]["image_error"].startswith("cannot decode")


def test_too_large_and_too_small_images_are_rejected() -> None:
    data = _rows(8)
    data["image"][3] = {"bytes": _png(3, size=(40, 40)), "path": None}
    data["image"][6] = {"bytes": _png(6, size=(30, 4)), "path": None}

    report = _validate(data, ValidationConfig(max_image_pixels=1000, min_image_side=8))

    failed = _failed(report)
    assert [(o.description, o.examples) for o in failed] == [
        ("image width*height <= 1000", [{"row": 3, "image_pixels": 1600}]),
        ("image shorter side >= 8", [{"row": 6, "image_min_side": 4}]),
    ]


def test_decompression_bombs_are_rejected_from_the_header_without_decoding() -> None:
    data = _rows(8)
    data["image"][1] = {"bytes": _png_header_only(20_000, 20_000), "path": None}  # past PIL's hard limit
    data["image"][4] = {"bytes": _png_header_only(10_000, 10_000), "path": None}  # past PIL's warning limit

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        report = _validate(data)

    failed = {o.description: o for o in _failed(report)}
    assert set(failed) == {"image bytes present, open and decode (PIL)", "image width*height <= 16777216"}
    (bomb,) = failed["image bytes present, open and decode (PIL)"].examples
    assert bomb["row"] == 1 and bomb["image_error"].startswith("decompression bomb")
    # Row 4 has no pixel data at all: it was never decoded, only measured.
    assert failed["image width*height <= 16777216"].examples == [{"row": 4, "image_pixels": 100_000_000}]


def test_images_referenced_by_path_are_read_and_a_dangling_path_is_reported(tmp_path: Path) -> None:
    data = _rows(4)
    picture = tmp_path / "picture.png"
    picture.write_bytes(_png(99))
    data["image"][0] = {"bytes": None, "path": str(picture)}
    data["image"][1] = {"bytes": None, "path": str(tmp_path / "gone.png")}

    failed = _only_failure(_validate(data), "expect_column_values_to_be_null", "image")

    assert [example["row"] for example in failed.examples] == [1]
    assert "gone.png" in failed.examples[0]["image_error"]


def test_missing_columns_are_named_and_their_checks_skipped() -> None:
    data = _rows(6)
    for name in ("safer_response_id", "image"):
        del data[name]
    features = datasets.Features({k: v for k, v in schema.PAIRED_FEATURES.items() if k in data})

    report = validate_splits({"train": _dataset(data, features)}, ValidationConfig())

    failed = _failed(report)
    assert [(o.expectation, o.examples) for o in failed] == [
        ("expect_table_columns_to_match_set", ["image", "safer_response_id"])
    ]
    assert "image" in report.failure_message() and "safer_response_id" in report.failure_message()
    assert not any(o.column in ("safer_response_id", "image") for o in report.outcomes)
    assert report.leakage["checked"] is False


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [({"min_rows": {"train": 7}}, "row count >= 7"), ({"max_rows": {"train": 5}}, "row count <= 5")],
)
def test_row_count_out_of_bounds_is_rejected(bounds: dict[str, dict[str, int]], expected: str) -> None:
    cfg = ValidationConfig(**{"min_rows": {}, "max_rows": {}, **bounds})

    report = _validate(_rows(6), cfg)

    failed = _failed(report)
    assert [(o.expectation, o.description, o.examples) for o in failed] == [
        ("expect_table_row_count_to_be_between", expected, [6])
    ]


def test_split_without_row_bounds_has_no_row_count_check() -> None:
    report = _validate(_rows(3), ValidationConfig(min_rows={"evaluation": 10}, max_rows={}))

    assert report.success, report.failure_message()
    assert not any(o.expectation == "expect_table_row_count_to_be_between" for o in report.outcomes)


def test_duplicate_rows_are_rejected() -> None:
    data = _rows(8)
    for name in data:
        data[name][5] = data[name][4]

    failed = _only_failure(
        _validate(data), "expect_compound_columns_to_be_unique", "question, image, response_1, response_2"
    )

    assert failed.unexpected_count == 2  # both copies are members of the duplicated group
    assert [example["row"] for example in failed.examples] == [4, 5]


def _leaky_splits() -> dict[str, datasets.Dataset]:
    train, evaluation = _rows(8), _rows(4, split_tag=1)
    evaluation["image"][1] = train["image"][3]
    return {"train": _dataset(train), "evaluation": _dataset(evaluation)}


def test_leakage_is_reported_without_failing_by_default() -> None:
    report = validate_splits(_leaky_splits(), ValidationConfig())

    assert report.success, report.failure_message()
    assert report.leakage["count"] == 1
    assert report.leakage["examples"] == {"train": [3], "evaluation": [1]}
    assert report.leakage["fails"] is False


def test_leakage_fails_when_configured() -> None:
    report = validate_splits(_leaky_splits(), ValidationConfig(fail_on_leakage=True))

    assert not report.success
    assert all(o.success for o in report.outcomes)
    assert report.failure_message() == (
        "train<->evaluation: 1 images shared (by sha256), e.g. train rows [3], evaluation rows [1]"
    )


def test_data_docs_are_written(tmp_path: Path) -> None:
    docs = tmp_path / "docs"

    report = validate_splits({"train": _dataset(_rows(4))}, ValidationConfig(), docs_dir=docs)

    assert report.success
    assert (docs / "index.html").is_file()
    assert any(docs.glob("validations/**/*.html"))
    assert "beavertails-v-train" in (docs / "index.html").read_text()


def _flat(data: dict[str, list[Any]]) -> datasets.Dataset:
    """The first response of each pair as a flattened one-response-per-row data set."""
    flat = {name: data[name] for name in ("question", "image", "category", "image_severity")}
    flat["response"], flat["is_response_safe"] = data["response_1"], data["is_response_1_safe"]
    return _dataset(flat, schema.FLAT_FEATURES)


def test_flat_layout_validates() -> None:
    report = validate_splits({"train": _flat(_rows(6))}, ValidationConfig())

    assert report.success, report.failure_message()
    assert report.statistics["train"]["safe_ratio"] == 0.5
    assert any(o.column == "is_response_safe" for o in report.outcomes)
    assert not any(o.column == "more_helpful_response_id" for o in report.outcomes)


def test_flat_layout_rejects_bad_safe_flag() -> None:
    data = _rows(6)
    data["is_response_1_safe"][2] = "maybe"

    report = validate_splits({"train": _flat(data)}, ValidationConfig())

    failed = _only_failure(report, "expect_column_values_to_be_in_set", "is_response_safe")
    assert failed.examples == [{"row": 2, "is_response_safe": "maybe"}]


def test_no_splits_is_an_error() -> None:
    with pytest.raises(ValueError, match="no splits to validate"):
        validate_splits({}, ValidationConfig())


def test_an_expectation_gx_could_not_compute_is_a_failure_carrying_the_error() -> None:
    config = ExpectationConfiguration(
        type="expect_column_values_to_be_between",
        kwargs={"column": "image_severity", "min_value": 0},
        meta={"column": "image_severity", "description": "image_severity >= 0", "shown": ["image_severity"]},
    )
    error = {"raised_exception": True, "exception_message": "boolean value of NA is ambiguous"}
    result = ExpectationValidationResult(
        success=False, expectation_config=config, result={}, exception_info={"metric-id": error}
    )

    outcome = _outcome("train", result, pd.DataFrame({"image_severity": [0, 1, 2]}))

    assert not outcome.success
    assert (outcome.column, outcome.element_count) == ("image_severity", 3)
    assert outcome.examples == ["error: boolean value of NA is ambiguous"]
