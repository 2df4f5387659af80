"""Validate BeaverTails-V splits with one great-expectations suite per split.

Each split becomes a pandas frame holding its raw scalar columns plus derived check columns, because
GX 1.x has no expectation for several of the facts that matter here (two responses differ, a safe
flag agrees with its rate, an image decodes). The image column is carried as the sha256 of its bytes
(so GX results and data docs never hold raw bytes, and duplicates and train/evaluation leakage are
found by content), next to its header size and any decoding error. Checks whose source columns are
missing are skipped: the missing columns are already one failure, and a cascade of errors about the
same cause would hide it.

Label facts the suite relies on (BeaverTails-V card and a label audit of the released data): a
response is safe iff its harmless rate is >= 0, exactly; the preferred response's rate is lower than
the other's in a fraction of a percent of real rows, so preference agreement uses a `mostly`
tolerance and the disagreeing count is always reported.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig
from PIL import Image

from safe_rlhf_v.config import ValidationConfig
from safe_rlhf_v.data import schema
from safe_rlhf_v.data.sources import DataSourceError

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 5
"""Example rows shown per failed expectation."""
LEAKAGE_SPLITS: tuple[str, str] = ("train", "evaluation")
"""Splits compared for shared images unless the caller names others (e.g. from `DataConfig`)."""
INTEGER_DTYPES: list[str] = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
DOCS_SITE = "safe-rlhf-v"
IMAGE_COLUMN = "image"
IMAGE_ERROR = "image_error"
IMAGE_PIXELS = "image_pixels"
IMAGE_MIN_SIDE = "image_min_side"
RESPONSES_DIFFER = "responses_differ"
_PREFERENCES: dict[str, str] = {"more_helpful_response_id": "helpful", "safer_response_id": "harmless"}
"""Preference id column -> the rate kind it must agree with (`response_N_<kind>_rate`)."""


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's verdict on one split, in terms of the data set's own columns.

    For per-row expectations the counts are rows and `examples` are dicts holding the row index and
    the values of the columns involved; for table-level ones (columns present, dtypes, row count)
    `element_count` is 1 and `examples` hold what was observed (missing column names, a dtype, a count).
    """

    split: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    element_count: int
    examples: list[Any]
    description: str


@dataclass(frozen=True)
class ValidationReport:
    """Everything the validation found: verdicts, per-split statistics, leakage and raw GX results."""

    success: bool
    outcomes: list[ExpectationOutcome]
    statistics: dict[str, dict[str, Any]]
    leakage: dict[str, Any]
    gx_results: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict, for MLflow artifacts and KFP metadata."""
        return asdict(self)

    def failure_message(self) -> str:
        """One line per failed expectation (and failing leakage), empty when everything passed."""
        lines = [_outcome_line(outcome) for outcome in self.outcomes if not outcome.success]
        if self.leakage.get("fails"):
            first, second = self.leakage["splits"]
            lines.append(
                f"{first}<->{second}: {self.leakage['count']} images shared (by sha256), "
                f"e.g. {first} rows {self.leakage['examples'][first]}, "
                f"{second} rows {self.leakage['examples'][second]}"
            )
        return "\n".join(lines)


def _outcome_line(outcome: ExpectationOutcome) -> str:
    target = outcome.column if outcome.column is not None else "<table>"
    return (
        f"{outcome.split}: {outcome.expectation} on {target} failed ({outcome.description}): "
        f"{outcome.unexpected_count} of {outcome.element_count} unexpected; "
        f"examples: {outcome.examples[:MAX_EXAMPLES]}"
    )


def validate_splits(
    splits: Mapping[str, datasets.Dataset],
    cfg: ValidationConfig,
    docs_dir: Path | None = None,
    *,
    leakage_splits: tuple[str, str] = LEAKAGE_SPLITS,
) -> ValidationReport:
    """Run one GX suite per split, compute statistics and train/evaluation image leakage.

    `splits` maps split name to a data set in the paired or the flattened BeaverTails-V layout.
    When `docs_dir` is given, the GX HTML data docs are written there (`index.html` at its root).
    """
    if not splits:
        raise ValueError("no splits to validate: the mapping of split name to data set is empty")
    frames: dict[str, pd.DataFrame] = {}
    suites: dict[str, list[Any]] = {}
    statistics: dict[str, dict[str, Any]] = {}
    for split, dataset in splits.items():
        layout = _layout(dataset.column_names)
        frame = _frame(split, dataset, layout, cfg.max_image_pixels)
        frames[split] = frame
        suites[split] = _expectations(split, frame, layout, cfg)
        statistics[split] = _statistics(frame, layout)
    results = _run_suites(frames, suites, docs_dir)
    outcomes = [
        outcome
        for split, result in results.items()
        for outcome in _outcomes(split, result, frames[split], suites[split])
    ]
    leakage = _leakage(frames, leakage_splits, cfg.fail_on_leakage)
    success = all(outcome.success for outcome in outcomes) and not leakage["fails"]
    for split in frames:
        failed = sum(not outcome.success for outcome in outcomes if outcome.split == split)
        logger.info("validated split %s: %d rows, %d failed expectations", split, len(frames[split]), failed)
    return ValidationReport(
        success=success,
        outcomes=outcomes,
        statistics=statistics,
        leakage=leakage,
        gx_results={split: result.to_json_dict() for split, result in results.items()},
    )


def _layout(columns: list[str]) -> schema.Layout:
    """The layout a data set claims, even when it misses columns (those are reported, not fatal).

    Any column only the paired layout has (e.g. `response_1`) makes it paired; otherwise it is
    checked as flattened."""
    try:
        return schema.detect_layout(columns)
    except ValueError:
        paired_only = set(schema.PAIRED_COLUMNS) - set(schema.FLAT_COLUMNS)
        return "paired" if paired_only & set(columns) else "flat"


def _expected_features(layout: schema.Layout) -> datasets.Features:
    return schema.PAIRED_FEATURES if layout == "paired" else schema.FLAT_FEATURES


# --- the frame: raw scalar columns plus derived check columns ------------------------------------


def _frame(split: str, dataset: datasets.Dataset, layout: schema.Layout, max_pixels: int) -> pd.DataFrame:
    """Raw expected columns (extra ones are not checked) plus image facts and derived columns."""
    expected = _expected_features(layout)
    scalar = [name for name in expected if name != IMAGE_COLUMN and name in dataset.column_names]
    frame = dataset.select_columns(scalar).to_pandas() if scalar else pd.DataFrame(index=range(len(dataset)))
    frame = frame.reset_index(drop=True)
    if IMAGE_COLUMN in dataset.column_names:
        facts = _image_facts(split, dataset, max_pixels)
        frame = pd.concat([frame, facts], axis=1)
    _add_derived(frame, layout)
    return frame


def _image_facts(split: str, dataset: datasets.Dataset, max_pixels: int) -> pd.DataFrame:
    """Sha256, decoding error, pixel count and shorter side of every image, read from the raw bytes."""
    try:
        raw = dataset.select_columns([IMAGE_COLUMN]).cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    except (TypeError, ValueError) as error:
        feature = dataset.features[IMAGE_COLUMN]
        raise DataSourceError(
            f"split {split!r}: column {IMAGE_COLUMN!r} of type {feature} cannot be read as images: {error}"
        ) from error
    rows = [
        _inspect_image(value, max_pixels)
        for batch in raw.iter(batch_size=256)
        for value in batch[IMAGE_COLUMN]
    ]
    frame = pd.DataFrame(rows, columns=[IMAGE_COLUMN, IMAGE_ERROR, IMAGE_PIXELS, IMAGE_MIN_SIDE])
    for column in (IMAGE_PIXELS, IMAGE_MIN_SIDE):
        frame[column] = frame[column].astype("Int64")
    return frame


def _image_bytes(value: dict[str, Any] | None) -> bytes:
    """The encoded image: embedded bytes, or the local file a path-only record points to."""
    if value is None:
        raise ValueError("image is null")
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value.get("path")
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    raise ValueError(f"image has no bytes and its path {path!r} is not a readable file")


def _inspect_image(
    value: dict[str, Any] | None, max_pixels: int
) -> tuple[str | None, str | None, int | None, int | None]:
    """(sha256, error, width*height, shorter side) of one image record.

    The size comes from the header alone; an image above `max_pixels` is never decompressed (the
    pixel-count expectation reports it), and one so large that PIL refuses to even open it as a
    decompression bomb (over twice `PIL.Image.MAX_IMAGE_PIXELS`, whatever `max_pixels` says) is
    reported as an error instead of ending the run."""
    try:
        data = _image_bytes(value)
    except ValueError as error:
        return None, str(error), None, None
    digest = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        # The size is checked against the configured limit; PIL's own warning adds nothing.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            return digest, f"decompression bomb: {error}", None, None
        except Exception as error:  # PIL raises many types for unreadable headers; all mean "corrupt"
            return digest, f"cannot open: {error}", None, None
        width, height = image.size
        error = None if width * height > max_pixels else _decode_error(image)
        return digest, error, width * height, min(width, height)


def _decode_error(image: Image.Image) -> str | None:
    try:
        image.load()
    except Exception as error:  # truncated or corrupt data surfaces as OSError, SyntaxError, ValueError...
        return f"cannot decode: {error}"
    return None


def _numeric(frame: pd.DataFrame, column: str) -> pd.Series:
    """A rate column as floats, NaN where missing or not a number (the dtype check reports those)."""
    return pd.to_numeric(frame[column], errors="coerce")


def _flag_matches_rate_column(response_id: str) -> str:
    return f"is_response_{response_id}_safe_matches_rate"


def _preference_columns(id_column: str) -> tuple[str, str]:
    """Derived columns: the rate of the response `id_column` prefers, and the other response's rate."""
    return f"{id_column}_preferred_rate", f"{id_column}_other_rate"


def _add_derived(frame: pd.DataFrame, layout: schema.Layout) -> None:
    """Add the derived columns whose sources are all present; undecidable rows hold null and are skipped."""
    if layout != "paired":
        return
    columns = set(frame.columns)
    for response_id in schema.RESPONSE_IDS:
        flag, rate = f"is_response_{response_id}_safe", f"response_{response_id}_harmless_rate"
        if {flag, rate} <= columns:
            rates = _numeric(frame, rate)
            decidable = frame[flag].isin(schema.YES_NO) & rates.notna()
            matches = (frame[flag] == "yes") == (rates >= 0)
            frame[_flag_matches_rate_column(response_id)] = matches.astype(object).where(decidable, None)
    if {"response_1", "response_2"} <= columns:
        decidable = frame["response_1"].notna() & frame["response_2"].notna()
        differ = frame["response_1"] != frame["response_2"]
        frame[RESPONSES_DIFFER] = differ.astype(object).where(decidable, None)
    for id_column, kind in _PREFERENCES.items():
        rate_1, rate_2 = f"response_1_{kind}_rate", f"response_2_{kind}_rate"
        if {id_column, rate_1, rate_2} <= columns:
            first, second = _numeric(frame, rate_1), _numeric(frame, rate_2)
            preferred, other = _preference_columns(id_column)
            chosen = frame[id_column]
            frame[preferred] = first.where(chosen == "1", second.where(chosen == "2"))
            frame[other] = second.where(chosen == "1", first.where(chosen == "2"))


# --- the suite ------------------------------------------------------------------------------------


def _expect(
    expectation: type[gxe.Expectation], label: str | None, description: str, shown: list[str], **kwargs: Any
) -> gxe.Expectation:
    """An expectation whose meta says how to report it: the data set column(s) it is about, a human
    sentence, and the columns whose values illustrate a failing row."""
    return expectation(**kwargs, meta={"column": label, "description": description, "shown": shown})


def _bounds(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"in {low}..{high}"
    return f">= {low}" if low is not None else f"<= {high}"


def _text_columns(layout: schema.Layout) -> list[str]:
    responses = [f"response_{i}" for i in schema.RESPONSE_IDS] if layout == "paired" else ["response"]
    return ["question", *responses]


def _value_sets(layout: schema.Layout) -> dict[str, tuple[str, ...]]:
    sets: dict[str, tuple[str, ...]] = {"category": schema.CATEGORIES}
    if layout == "paired":
        sets.update(dict.fromkeys(_PREFERENCES, schema.RESPONSE_IDS))
        sets.update({f"is_response_{i}_safe": schema.YES_NO for i in schema.RESPONSE_IDS})
    else:
        sets["is_response_safe"] = schema.YES_NO
    return sets


def _ranges(layout: schema.Layout) -> dict[str, tuple[int | None, int | None]]:
    ranges: dict[str, tuple[int | None, int | None]] = {"image_severity": (0, None)}
    if layout == "paired":
        for i in schema.RESPONSE_IDS:
            ranges[f"response_{i}_harmless_rate"] = schema.HARMLESS_RATE_RANGE
            ranges[f"response_{i}_helpful_rate"] = schema.HELPFUL_RATE_RANGE
    return ranges


def _expectations(split: str, frame: pd.DataFrame, layout: schema.Layout, cfg: ValidationConfig) -> list[Any]:
    """The suite of one split: only checks whose source columns are present."""
    expected = _expected_features(layout)
    checks = [
        _expect(
            gxe.ExpectTableColumnsToMatchSet,
            None,
            f"all {layout}-layout columns present",
            [],
            column_set=list(expected),
            exact_match=False,
        ),
        *_column_checks(frame, expected),
        *_value_checks(frame, layout),
        *_derived_checks(frame, layout, cfg),
        *_image_checks(frame, cfg),
    ]
    key = [*_text_columns(layout)[:1], IMAGE_COLUMN, *_text_columns(layout)[1:]]
    if set(key) <= set(frame.columns):
        checks.append(
            _expect(
                gxe.ExpectCompoundColumnsToBeUnique,
                ", ".join(key),
                f"rows unique by ({', '.join(key)}), image by sha256 (mostly {cfg.duplicate_mostly})",
                key,
                column_list=key,
                mostly=cfg.duplicate_mostly,
            )
        )
    low, high = cfg.min_rows.get(split), cfg.max_rows.get(split)
    if low is not None or high is not None:
        checks.append(
            _expect(
                gxe.ExpectTableRowCountToBeBetween,
                None,
                f"row count {_bounds(low, high)}",
                [],
                min_value=low,
                max_value=high,
            )
        )
    return checks


def _column_checks(frame: pd.DataFrame, expected: datasets.Features) -> list[Any]:
    """Non-null and dtype of every expected scalar column (the image has its own checks)."""
    checks = []
    for name, feature in expected.items():
        if name == IMAGE_COLUMN or name not in frame.columns:
            continue
        checks.append(
            _expect(gxe.ExpectColumnValuesToNotBeNull, name, f"{name} is never null", [name], column=name)
        )
        if feature.dtype == "string":
            checks.append(
                _expect(
                    gxe.ExpectColumnValuesToBeOfType,
                    name,
                    f"{name} holds strings",
                    [name],
                    column=name,
                    type_="str",
                )
            )
        else:
            checks.append(
                _expect(
                    gxe.ExpectColumnValuesToBeInTypeList,
                    name,
                    f"{name} holds integers",
                    [name],
                    column=name,
                    type_list=INTEGER_DTYPES,
                )
            )
    return checks


def _value_checks(frame: pd.DataFrame, layout: schema.Layout) -> list[Any]:
    """Text not blank, ids/flags/categories from their value sets, rates and severity in range."""
    present = set(frame.columns)
    checks = [
        _expect(
            gxe.ExpectColumnValuesToMatchRegex,
            name,
            f"{name} is not empty after strip",
            [name],
            column=name,
            regex=r"\S",
        )
        for name in _text_columns(layout)
        if name in present
    ]
    for name, values in _value_sets(layout).items():
        if name in present:
            allowed = (
                f"one of the {len(values)} harm categories" if name == "category" else f"in {list(values)}"
            )
            checks.append(
                _expect(
                    gxe.ExpectColumnValuesToBeInSet,
                    name,
                    f"{name} {allowed}",
                    [name],
                    column=name,
                    value_set=list(values),
                )
            )
    for name, (low, high) in _ranges(layout).items():
        # A non-numeric column already fails its dtype check; comparing its values to numbers would
        # only add an error about the same cause.
        if name in present and pd.api.types.is_numeric_dtype(frame[name]):
            checks.append(
                _expect(
                    gxe.ExpectColumnValuesToBeBetween,
                    name,
                    f"{name} {_bounds(low, high)}",
                    [name],
                    column=name,
                    min_value=low,
                    max_value=high,
                )
            )
    return checks


def _derived_checks(frame: pd.DataFrame, layout: schema.Layout, cfg: ValidationConfig) -> list[Any]:
    """Safe flags agree with rates (exactly), responses differ, preference ids agree with rates (mostly)."""
    if layout != "paired":
        return []
    present = set(frame.columns)
    checks = []
    for i in schema.RESPONSE_IDS:
        flag, rate = f"is_response_{i}_safe", f"response_{i}_harmless_rate"
        derived = _flag_matches_rate_column(i)
        if derived in present:
            checks.append(
                _expect(
                    gxe.ExpectColumnValuesToBeInSet,
                    flag,
                    f"{flag} is 'yes' iff {rate} >= 0",
                    [flag, rate],
                    column=derived,
                    value_set=[True],
                )
            )
    if RESPONSES_DIFFER in present:
        checks.append(
            _expect(
                gxe.ExpectColumnValuesToBeInSet,
                "response_1, response_2",
                "response_1 differs from response_2",
                ["response_1", "response_2"],
                column=RESPONSES_DIFFER,
                value_set=[True],
            )
        )
    for id_column, kind in _PREFERENCES.items():
        preferred, other = _preference_columns(id_column)
        if preferred in present:
            checks.append(
                _expect(
                    gxe.ExpectColumnPairValuesAToBeGreaterThanB,
                    id_column,
                    f"the response {id_column} names has {kind} rate >= the other's "
                    f"(mostly {cfg.preference_mostly})",
                    [id_column, f"response_1_{kind}_rate", f"response_2_{kind}_rate"],
                    column_A=preferred,
                    column_B=other,
                    or_equal=True,
                    ignore_row_if="either_value_is_missing",
                    mostly=cfg.preference_mostly,
                )
            )
    return checks


def _image_checks(frame: pd.DataFrame, cfg: ValidationConfig) -> list[Any]:
    if IMAGE_COLUMN not in frame.columns:
        return []
    return [
        _expect(
            gxe.ExpectColumnValuesToBeNull,
            IMAGE_COLUMN,
            "image bytes present, open and decode (PIL)",
            [IMAGE_ERROR],
            column=IMAGE_ERROR,
        ),
        _expect(
            gxe.ExpectColumnValuesToBeBetween,
            IMAGE_COLUMN,
            f"image width*height <= {cfg.max_image_pixels}",
            [IMAGE_PIXELS],
            column=IMAGE_PIXELS,
            max_value=cfg.max_image_pixels,
        ),
        _expect(
            gxe.ExpectColumnValuesToBeBetween,
            IMAGE_COLUMN,
            f"image shorter side >= {cfg.min_image_side}",
            [IMAGE_MIN_SIDE],
            column=IMAGE_MIN_SIDE,
            min_value=cfg.min_image_side,
        ),
    ]


# --- running GX and reading its results ------------------------------------------------------------


def _run_suites(
    frames: dict[str, pd.DataFrame], suites: dict[str, list[Any]], docs_dir: Path | None
) -> dict[str, ExpectationSuiteValidationResult]:
    """One ephemeral context; per split an asset, a suite, a validation definition and a checkpoint
    (the checkpoint updates the data docs when `docs_dir` is given)."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions: list[Any] = []
    if docs_dir is not None:
        docs_dir.mkdir(parents=True, exist_ok=True)
        context.add_data_docs_site(
            site_name=DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(UpdateDataDocsAction(name="update-data-docs", site_names=[DOCS_SITE]))
    source = context.data_sources.add_pandas(name="beavertails-v")
    results = {}
    for split, frame in frames.items():
        batch = source.add_dataframe_asset(name=split).add_batch_definition_whole_dataframe(name=split)
        suite = context.suites.add(
            gx.ExpectationSuite(name=f"beavertails-v-{split}", expectations=suites[split])
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate-{split}", data=batch, suite=suite)
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"checkpoint-{split}",
                validation_definitions=[definition],
                actions=actions,
                result_format={"result_format": "SUMMARY"},
            )
        )
        (result,) = checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()
        results[split] = result
    return results


def _raised(result: ExpectationValidationResult) -> list[str]:
    """Messages of exceptions GX caught while computing the expectation's metrics."""
    info = result.exception_info or {}
    entries = [info] if "raised_exception" in info else list(info.values())
    return [str(entry.get("exception_message")) for entry in entries if entry.get("raised_exception")]


def _outcomes(
    split: str, suite_result: ExpectationSuiteValidationResult, frame: pd.DataFrame, suite: list[Any]
) -> list[ExpectationOutcome]:
    """Outcomes in the order the suite lists its expectations (GX returns them grouped by metric)."""
    position = {expectation.id: index for index, expectation in enumerate(suite)}
    ordered = sorted(suite_result.results, key=lambda result: position[result.expectation_config.id])
    return [_outcome(split, result, frame) for result in ordered]


def _outcome(split: str, result: ExpectationValidationResult, frame: pd.DataFrame) -> ExpectationOutcome:
    config = result.expectation_config
    meta, details = config.meta, result.result or {}
    base = {
        "split": split,
        "expectation": config.type,
        "column": meta["column"],
        "description": meta["description"],
    }
    errors = _raised(result)
    if errors:
        return ExpectationOutcome(
            **base,
            success=False,
            unexpected_count=0,
            element_count=len(frame),
            examples=[f"error: {message}" for message in errors],
        )
    if "unexpected_count" in details:
        rows = details.get("partial_unexpected_index_list") or []
        examples = [_example(frame, int(row), meta["shown"]) for row in rows[:MAX_EXAMPLES]]
        return ExpectationOutcome(
            **base,
            success=bool(result.success),
            unexpected_count=details["unexpected_count"],
            element_count=details["element_count"],
            examples=examples,
        )
    if config.type == "expect_table_columns_to_match_set":
        missing = details.get("details", {}).get("mismatched", {}).get("missing", [])
        return ExpectationOutcome(
            **base,
            success=bool(result.success),
            unexpected_count=len(missing),
            element_count=len(config.kwargs["column_set"]),
            examples=list(missing),
        )
    return ExpectationOutcome(
        **base,
        success=bool(result.success),
        unexpected_count=int(not result.success),
        element_count=1,
        examples=[_jsonable(details.get("observed_value"))],
    )


def _example(frame: pd.DataFrame, row: int, shown: list[str]) -> dict[str, Any]:
    return {"row": row, **{column: _jsonable(frame.at[row, column]) for column in shown}}


def _jsonable(value: Any, max_chars: int = 200) -> Any:
    """A plain JSON value; long strings are cut so failure messages stay readable."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and len(value) > max_chars:
        return value[:max_chars] + "…"
    return value


# --- statistics and leakage --------------------------------------------------------------------------


def _share(hits: pd.Series, known: pd.Series) -> float | None:
    total = int(known.sum())
    return int(hits.sum()) / total if total else None


def _statistics(frame: pd.DataFrame, layout: schema.Layout) -> dict[str, Any]:
    """Rows, categories, safe ratio, harmful-image share and label disagreement counts of one split."""
    columns = set(frame.columns)
    stats: dict[str, Any] = {"rows": len(frame)}
    if "category" in columns:
        counts = frame["category"].value_counts()
        stats["categories"] = {str(name): int(count) for name, count in sorted(counts.items())}
    if layout == "paired":
        rates = [
            _numeric(frame, c)
            for c in (f"response_{i}_harmless_rate" for i in schema.RESPONSE_IDS)
            if c in columns
        ]
        if rates:
            stacked = pd.concat(rates, ignore_index=True)
            stats["safe_ratio"] = _share(stacked >= 0, stacked.notna())
        stats["preference_disagreements"] = {
            id_column: int((frame[preferred] < frame[other]).sum())
            for id_column, (preferred, other) in ((c, _preference_columns(c)) for c in _PREFERENCES)
            if preferred in columns
        }
        stats["safe_flag_disagreements"] = {
            f"is_response_{i}_safe": int(frame[_flag_matches_rate_column(i)].eq(False).sum())
            for i in schema.RESPONSE_IDS
            if _flag_matches_rate_column(i) in columns
        }
    elif "is_response_safe" in columns:
        flags = frame["is_response_safe"]
        stats["safe_ratio"] = _share(flags == "yes", flags.isin(schema.YES_NO))
    if "image_severity" in columns:
        severity = _numeric(frame, "image_severity")
        stats["harmful_image_share"] = _share(severity > 0, severity.notna())
    return stats


def _leakage(frames: dict[str, pd.DataFrame], pair: tuple[str, str], fail: bool) -> dict[str, Any]:
    """Images (by sha256 of their bytes) present in both splits of `pair`, with example rows."""
    first, second = pair
    report: dict[str, Any] = {
        "splits": [first, second],
        "checked": False,
        "count": 0,
        "examples": {first: [], second: []},
        "fails": False,
    }
    if not all(split in frames and IMAGE_COLUMN in frames[split].columns for split in pair):
        return report
    hashes = {split: frames[split][IMAGE_COLUMN] for split in pair}
    shared = set(hashes[first].dropna()) & set(hashes[second].dropna())
    report.update(
        checked=True,
        count=len(shared),
        examples={
            split: [int(row) for row in hashes[split].index[hashes[split].isin(shared)][:MAX_EXAMPLES]]
            for split in pair
        },
        fails=fail and bool(shared),
    )
    return report
