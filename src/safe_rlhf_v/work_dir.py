"""The layout of `work_dir`: what the pipeline keeps there for every stage and run.

One module names it, so the stage context can refuse an output location that would overwrite
any of it, and no stage spells a path of its own.
"""

from __future__ import annotations

from pathlib import Path

MLFLOW_DB = "mlflow.db"
"""The local MLflow store (sqlite), used when no tracking URI is configured."""
MLRUNS = "mlruns"
"""The local MLflow store's artifacts."""
KEY_FILE = "checkpoint.key"
"""The key that seals resume checkpoints (see `train.integrity`)."""
CACHE = "cache"
CHECKPOINTS = "checkpoints"
RESERVED = (MLFLOW_DB, MLRUNS, KEY_FILE, CACHE, CHECKPOINTS)


def data_cache(work_dir: str | Path) -> Path:
    """Where loaded data sets are cached (Arrow files of `datasets`)."""
    return Path(work_dir) / CACHE / "data"


def model_cache(work_dir: str | Path) -> Path:
    """Where `s3://` model folders are downloaded, once per node."""
    return Path(work_dir) / CACHE / "models"


def checkpoints(work_dir: str | Path, pipeline_run_id: str, task: str) -> Path:
    """Resume checkpoints of one task: stable across retries of the same pipeline run."""
    return Path(work_dir) / CHECKPOINTS / pipeline_run_id / task
