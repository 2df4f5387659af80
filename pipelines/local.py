"""Run the real pipeline on this machine through `kfp.local.SubprocessRunner(use_venv=False)`.

Every task runs as a subprocess of this Python interpreter, so the installed package is importable in
the components exactly as it is in the container image on a cluster. Each run gets its own folder
`<work_dir>/runs/<timestamp>/` holding KFP's task outputs, the run's resolved `config.json` (what the
pipeline's `config` parameter names, as a preset or a URI does on a cluster) and its `summary.json`.
The run prints one progress line per stage (`progress.StageProgress`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import local

from safe_rlhf_v import progress, storage
from safe_rlhf_v.components.kfp_io import RUN_ID_ENV
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.pipelines.safe_rlhf_v import build_pipeline
from safe_rlhf_v.records import StageResult
from safe_rlhf_v.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class LocalRun:
    """Where a local run left its outputs, and how each stage ended."""

    run_dir: Path
    summary_path: Path
    succeeded: bool
    stages: dict[str, dict[str, Any]]
    error: str | None
    tracking_uri: str


def _absolute(path: str) -> str:
    """An existing local path made absolute; URIs (s3://, hf://) and hub ids pass unchanged."""
    return str(Path(path).resolve()) if "://" not in path and Path(path).exists() else path


def local_config(cfg: PipelineConfig) -> PipelineConfig:
    """The config as the local runner needs it.

    Local paths become absolute, so task subprocesses find the same files whatever their working
    directory. Cluster-only task settings that kfp.local would otherwise honour are dropped: retries
    (a failed local stage is a bug to see at once, not a preempted node to wait out) and the
    cluster's environment variables (its in-cluster MLflow URI means nothing here).
    """
    return cfg.model_copy(
        update={
            "kubernetes": cfg.kubernetes.model_copy(update={"retries": 0, "env": {}}),
            "work_dir": str(Path(cfg.work_dir).resolve()),
            "base_model": _absolute(cfg.base_model),
            "data": cfg.data.model_copy(update={"uri": _absolute(cfg.data.uri)}),
        }
    )


def _payloads(output: Any) -> list[str]:
    """Stage results from a pipeline output: one JSON string, or (from a ParallelFor) nested lists."""
    if isinstance(output, list):
        return [payload for item in output for payload in _payloads(item)]
    return [output]


def stage_count(cfg: PipelineConfig) -> int:
    """How many tasks a run of `cfg` has: seven stages and one PPO task per ablation."""
    return 7 + len(cfg.ablations)


@contextlib.contextmanager
def _reporting(total: int, show_all: bool) -> Iterator[progress.StageProgress]:
    """Progress lines on stdout for the duration of a run; kfp.local's dumps hidden unless `show_all`."""
    root = logging.getLogger()
    report = progress.StageProgress(total, sys.stdout, show_all=show_all)
    root.addFilter(report)
    stdout = sys.stdout
    if not show_all:
        sys.stdout = progress.QuietStream(stdout)
    try:
        yield report
    finally:
        sys.stdout.flush()
        sys.stdout = stdout
        root.removeFilter(report)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment (and so the task subprocesses') for a while."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def run_local(cfg: PipelineConfig, data_uri: str | None = None) -> LocalRun:
    """Run the whole pipeline locally and write `summary.json`; never raises for a failed stage.

    The tasks get the run's id the way they do on a cluster, from `KFP_RUN_ID` in their environment.
    """
    if data_uri:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"uri": data_uri})})
    cfg = local_config(cfg)
    run_dir = Path(cfg.work_dir) / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    storage.atomic_write_text(config_path, cfg.model_dump_json(indent=2))
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(run_dir), raise_on_error=True)
    pipeline = build_pipeline(cfg, str(config_path))
    stages: dict[str, dict[str, Any]] = {}
    error = None
    started = time.monotonic()
    with (
        _environment(RUN_ID_ENV, f"local-{uuid.uuid4().hex[:12]}"),
        _reporting(stage_count(cfg), progress.verbose()) as report,
    ):
        try:
            with warnings.catch_warnings():
                # Resource requests, images and display names only matter on a cluster; kfp.local warns
                # about each of them for every task, which drowns the run's own output.
                warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
                warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
                task = pipeline(
                    data_uri=cfg.data.uri,
                    base_model=cfg.base_model,
                    cost_budget=cfg.train_ppo_lag.lagrangian.threshold,
                    ppo_max_steps=cfg.train_ppo_lag.actor.max_steps or 0,
                    ablations=list(cfg.ablations),
                    config=str(config_path),
                    config_overrides=[],
                )
            for output in task.outputs.values():
                for payload in _payloads(output):
                    result = StageResult.from_json(payload)
                    variant = result.details.get("variant")
                    stages[f"{result.stage}/{variant}" if variant else result.stage] = result.model_dump()
        except RuntimeError as failure:
            report.fail_current()
            error = str(failure)
            log.error("pipeline failed: %s", error)
    summary = {
        "pipeline": cfg.name,
        "status": "failed" if error else "succeeded",
        "error": error,
        "run_dir": str(run_dir),
        "seconds": round(time.monotonic() - started, 1),
        "tracking_uri": resolve_tracking_uri(cfg.tracking, cfg.work_dir),
        "stages": stages,
    }
    summary_path = run_dir / "summary.json"
    storage.atomic_write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True))
    return LocalRun(
        run_dir=run_dir,
        summary_path=summary_path,
        succeeded=error is None,
        stages=stages,
        error=error,
        tracking_uri=summary["tracking_uri"],
    )
