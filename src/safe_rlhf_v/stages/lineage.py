"""Lineage records every stage reads and writes: data digests and model digests.

A model folder carries `lineage.json` (the data digests it was trained on, the models it started
from, the pipeline run), so the registration stage and anyone holding the folder can trace it back
without MLflow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safe_rlhf_v import storage
from safe_rlhf_v.data.sources import DataSourceError
from safe_rlhf_v.stages.common import RESULT_FILE

LINEAGE_FILE = "lineage.json"
SPLITS = ("train", "evaluation")


def validated_dataset_uri(data_uri: str) -> str:
    """The `dataset/` folder inside a validate-data output."""
    return f"{data_uri.rstrip('/')}/dataset"


def arrow_sha256(split_dir: Path) -> str:
    """Content digest of a saved split: sha256 over its Arrow files.

    The JSON files `save_to_disk` writes beside them carry a fingerprint that depends on how the data
    was loaded, not on its content, so they are left out.
    """
    digest = hashlib.sha256()
    files = sorted(split_dir.glob("*.arrow"))
    if not files:
        raise FileNotFoundError(f"no Arrow files in {split_dir}")
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def dataset_digests(data_uri: str) -> dict[str, str]:
    """sha256 of each validated split, as recorded by validate-data.

    Training stages only accept validate-data outputs, so unvalidated data never reaches a GPU.
    """
    result_uri = f"{data_uri.rstrip('/')}/{RESULT_FILE}"
    recorded: dict[str, Any] = {}
    if storage.exists(result_uri):
        record = json.loads(storage.read_text(result_uri))
        if record.get("status") == "succeeded":
            recorded = {split: record.get("details", {}).get(f"{split}_sha256") for split in SPLITS}
    if not recorded or not all(recorded.values()):
        raise DataSourceError(
            f"{data_uri} is not a successful validate-data output (no {RESULT_FILE} with split digests); "
            "run `safe-rlhf-v validate-data --data SOURCE --out DIR` and pass DIR"
        )
    return {split: str(sha) for split, sha in recorded.items()}


def model_digest(uri: str) -> str:
    """Content digest of a model folder (local or s3://); a hub id is recorded as `hub:<id>`.

    Hashing a hub model would mean downloading it again; its id (with the revision the config pins)
    identifies it instead.
    """
    if storage.is_s3(uri) or Path(uri).exists():
        return storage.sha256_uri(uri)
    return f"hub:{uri}"


def write_lineage(folder: Path, record: dict[str, Any]) -> None:
    """Write `lineage.json` into a model folder being built."""
    storage.atomic_write_text(folder / LINEAGE_FILE, json.dumps(record, indent=2, sort_keys=True))


def read_lineage(uri: str) -> dict[str, Any]:
    """The lineage record of a model folder; {} when it has none."""
    path = f"{uri.rstrip('/')}/{LINEAGE_FILE}"
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}
