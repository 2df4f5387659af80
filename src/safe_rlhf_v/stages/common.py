"""What every stage shares: its result record and how outputs reach local folders or S3.

A stage builds its outputs in a local temporary folder and only then publishes them, by an atomic
rename for a local destination or an upload for `s3://`, so a failed stage never leaves a
half-written artifact that a later stage could mistake for a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from safe_rlhf_v import storage

RESULT_FILE = "result.json"


@dataclass
class StageResult:
    """The small record a stage returns: status, headline figures and where its outputs went."""

    stage: str
    status: Literal["succeeded", "failed"]
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    pipeline_run_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> StageResult:
        return cls(**json.loads(text))


@contextmanager
def staged_output(out_uri: str) -> Iterator[Path]:
    """Yield a local folder to fill; publish it to `out_uri` only if the block succeeds.

    Local destinations are replaced atomically (rename of a sibling temp folder). S3 destinations are
    uploaded from a local temp folder after the block completed.
    """
    if storage.is_s3(out_uri):
        with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
            yield Path(tmp)
            storage.upload(Path(tmp), out_uri)
        return
    with storage.atomic_dir(Path(out_uri)) as tmp:
        yield tmp


def write_json(path: Path, payload: Any) -> None:
    """Write JSON (sorted, indented) atomically."""
    storage.atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def local_model(uri: str, work_dir: str | Path) -> str:
    """A model folder Hugging Face can load: `s3://` prefixes are downloaded once per node into
    `<work_dir>/cache/models/`, local folders and hub ids pass unchanged.

    Under torchrun (or a multi-node TrainJob) the first process of each node downloads and the
    others wait at a barrier, so a 7B model is fetched once per node, not once per GPU. Lineage keeps
    recording the original URI; only loading uses the local copy.
    """
    if not storage.is_s3(uri):
        return uri
    import torch.distributed as dist

    target = Path(work_dir) / "cache" / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (target / "config.json").exists():
        storage.download(uri, target)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return str(target)
