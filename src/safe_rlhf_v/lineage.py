"""Lineage every stage reads and writes: data digests and model digests.

A model folder carries `lineage.json` (a `records.Lineage`: the data digests it was trained on,
the models it started from, the pipeline run), so the registration stage and anyone holding the
folder can trace it back without MLflow. This module sits below the stages and the registry, which
both use it; it imports neither.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from safe_rlhf_v import storage
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.records import LINEAGE_FILE, RESULT_FILE, Lineage, StageResult

SPLITS = ("train", "evaluation")


class NotValidatedData(UserError, ValueError):
    """A training or evaluation stage was given data that validate-data did not pass."""


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
    hint = "run `safe-rlhf-v validate-data --data SOURCE --out DIR` and pass DIR"
    if not storage.exists(result_uri):
        raise NotValidatedData(f"{data_uri} is not a validate-data output (no {RESULT_FILE}): {hint}")
    record = StageResult.from_json(storage.read_text(result_uri), result_uri)
    recorded = {split: record.details.get(f"{split}_sha256") for split in SPLITS}
    if record.stage != "validate-data" or record.status != "succeeded" or not all(recorded.values()):
        raise NotValidatedData(
            f"{data_uri} is not a successful validate-data output ({result_uri} is a {record.status} "
            f"{record.stage} result without split digests): {hint}"
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


def write_lineage(folder: Path, record: Lineage) -> None:
    """Write `lineage.json` into a model folder being built."""
    storage.atomic_write_text(folder / LINEAGE_FILE, record.model_dump_json(indent=2, exclude_none=True))


def read_lineage(uri: str) -> Lineage | None:
    """The lineage record of a model folder; None when it has none (a base model, say)."""
    path = f"{uri.rstrip('/')}/{LINEAGE_FILE}"
    if not storage.exists(path):
        return None
    return Lineage.parse(storage.read_text(path), path)
