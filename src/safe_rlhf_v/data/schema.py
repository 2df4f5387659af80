"""The BeaverTails-V record schema, its 20 harm categories and the severity scale.

Field names, dtypes and value sets follow the `saferlhf-v/BeaverTails-V` data set card (paired
format, one preference pair per row). The flattened variant (`PKU-Alignment/BeaverTails-V`, one
response per row) is described too because the guard trains on it. Everything else in the package
refers to these constants instead of spelling column names again.
"""

from __future__ import annotations

from typing import Final, Literal

import datasets

CATEGORIES: Final[tuple[str, ...]] = (
    "animal_abuse",
    "dangerous_behavior",
    "deception_in_personal_relationships",
    "discriminatory_depictions",
    "environmental_damage",
    "false_information",
    "financial_and_academic_fraud",
    "hacking_or_digital_crime",
    "harmful_health_content",
    "horror_and_gore",
    "identity_misuse_and_impersonation",
    "insulting_and_harassing_behavior",
    "pornographic_content",
    "privacy_invasion_and_surveillance",
    "psychological_harm_and_manipulation",
    "psychological_horror_and_dark_themes",
    "sensitive_information_in_key_areas",
    "sexual_crimes",
    "terrorism_or_extremism",
    "violence_and_physical_harm",
)

RESPONSE_IDS: Final[tuple[str, str]] = ("1", "2")
YES_NO: Final[tuple[str, str]] = ("yes", "no")
HARMLESS_RATE_RANGE: Final[tuple[int, int]] = (-3, 3)
HELPFUL_RATE_RANGE: Final[tuple[int, int]] = (0, 3)

Severity = Literal["safe", "minor", "moderate", "severe"]
SEVERITIES: Final[tuple[Severity, ...]] = ("safe", "minor", "moderate", "severe")

PAIRED_FEATURES: Final = datasets.Features(
    {
        "question": datasets.Value("string"),
        "image": datasets.Image(),
        "category": datasets.Value("string"),
        "image_severity": datasets.Value("int64"),
        "response_1": datasets.Value("string"),
        "response_2": datasets.Value("string"),
        "response_1_from": datasets.Value("string"),
        "response_2_from": datasets.Value("string"),
        "more_helpful_response_id": datasets.Value("string"),
        "safer_response_id": datasets.Value("string"),
        "is_response_1_safe": datasets.Value("string"),
        "is_response_2_safe": datasets.Value("string"),
        "response_1_harmless_rate": datasets.Value("int64"),
        "response_2_harmless_rate": datasets.Value("int64"),
        "response_1_helpful_rate": datasets.Value("int64"),
        "response_2_helpful_rate": datasets.Value("int64"),
    }
)

FLAT_FEATURES: Final = datasets.Features(
    {
        "question": datasets.Value("string"),
        "image": datasets.Image(),
        "category": datasets.Value("string"),
        "image_severity": datasets.Value("int64"),
        "response": datasets.Value("string"),
        "is_response_safe": datasets.Value("string"),
    }
)

PAIRED_COLUMNS: Final[tuple[str, ...]] = tuple(PAIRED_FEATURES)
FLAT_COLUMNS: Final[tuple[str, ...]] = tuple(FLAT_FEATURES)

Layout = Literal["paired", "flat"]


def detect_layout(columns: list[str] | tuple[str, ...]) -> Layout:
    """Tell the paired from the flattened layout by its columns, naming what is missing otherwise."""
    present = set(columns)
    if set(PAIRED_COLUMNS) <= present:
        return "paired"
    if set(FLAT_COLUMNS) <= present:
        return "flat"
    missing_paired = sorted(set(PAIRED_COLUMNS) - present)
    missing_flat = sorted(set(FLAT_COLUMNS) - present)
    raise ValueError(
        "data set is neither BeaverTails-V paired nor flattened: "
        f"paired layout misses {missing_paired}; flattened layout misses {missing_flat}"
    )


def is_safe(harmless_rate: int) -> bool:
    """A response is safe iff its harmlessness rate is >= 0 (0 is a bare refusal, counted safe)."""
    return harmless_rate >= 0


def severity_from_rate(harmless_rate: int) -> Severity:
    """Map the 7-point harmlessness rate to the paper's multi-level label."""
    low, high = HARMLESS_RATE_RANGE
    if not low <= harmless_rate <= high:
        raise ValueError(f"harmless rate {harmless_rate} is outside {low}..{high}")
    if harmless_rate >= 0:
        return "safe"
    return SEVERITIES[-harmless_rate]


def other_id(response_id: str) -> str:
    """The id of the other response of a pair ("1" <-> "2")."""
    if response_id not in RESPONSE_IDS:
        raise ValueError(f"response id must be one of {RESPONSE_IDS}, got {response_id!r}")
    return "2" if response_id == "1" else "1"
