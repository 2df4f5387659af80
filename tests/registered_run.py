"""The record the `registered_run` fixture (conftest.py) hands to tests, in a module of its own so
test files can name its type: two conftest modules exist (tests/ and tests/evaluate/), so
`from conftest import ...` resolves to whichever was imported first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RegisteredRun:
    """A pipeline run's four real tiny models, registered by the register stage into a fresh store."""

    cfg: Any
    tracking_uri: str
    folders: dict[str, Path]
    data_sha256: dict[str, str]
