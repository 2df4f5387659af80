"""MLflow lineage for every stage: runs, parameters, data set inputs with digests, models.

Run resolution follows the KFP MLflow plugin's contract: when the launcher injected
`MLFLOW_RUN_ID`, `mlflow.start_run()` resumes that run. Otherwise the stage opens a run nested under
the pipeline's parent run, found by the tag `kfp.pipeline_run_id` (and created by whoever comes
first), so a cluster without the plugin and the local runner produce the same tree.

MLflow caps a data set's `digest` at 36 characters, too short for a sha256. Inputs therefore carry
the first 32 hex characters as `digest` and the full sha256 in the input tag `sha256`, plus the
source URI, so a registered model can be traced to the exact bytes it was trained on.

A tracking server that is down must not stall a stage for minutes: unless the user set them,
`MLFLOW_HTTP_REQUEST_TIMEOUT` defaults to 20 s here (MLflow: 120) and
`MLFLOW_HTTP_REQUEST_MAX_RETRIES` to 2 (MLflow: 7, about four minutes of backoff), and an
unreachable server ends in one `TrackingUnreachable` line naming it, password masked.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import requests
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from safe_rlhf_v import work_dir as layout
from safe_rlhf_v.config import TrackingConfig
from safe_rlhf_v.errors import UserError, redact

PIPELINE_RUN_TAG = "kfp.pipeline_run_id"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
"""The MLflow 3 UI opens an experiment of this kind on its runs, not on the GenAI traces overview."""
NOTE_TAG = "mlflow.note.content"
"""A run's description, which the UI renders as markdown (tags show as plain text)."""
STAGE_TAG = "safe_rlhf_v.stage"
DIGEST_PREFIX_CHARS = 32
HTTP_TIMEOUT_S = 20
HTTP_MAX_RETRIES = 2


class TrackingUnreachable(UserError, RuntimeError):
    """The MLflow tracking server does not answer; the message names it (credentials masked)."""


def http_defaults() -> None:
    """Bound MLflow's HTTP waits, keeping any value the user set (see the module docstring)."""
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_TIMEOUT.name, str(HTTP_TIMEOUT_S))
    os.environ.setdefault(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, str(HTTP_MAX_RETRIES))


def _network_failure(error: BaseException) -> BaseException | None:
    """The connection error or timeout somewhere in an exception's chain, if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def tracking_errors(uri: str) -> Iterator[None]:
    """Turn "tracking server unreachable" into one TrackingUnreachable naming the server.

    MLflow reports a refused connection as a generic `MlflowException` after its retries
    (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`); the underlying requests error is in the exception chain.
    """
    try:
        yield
    except MlflowException as error:
        if _network_failure(error) is None:
            raise
        raise TrackingUnreachable(
            f"MLflow tracking server {redact(uri)} is unreachable: check MLFLOW_TRACKING_URI or "
            f"tracking.tracking_uri and that the server runs ({redact(error.message.splitlines()[0][:300])})"
        ) from None


def resolve_tracking_uri(tracking: TrackingConfig, work_dir: str | Path) -> str:
    """Config beats `MLFLOW_TRACKING_URI`, which beats a sqlite file in the work dir."""
    if tracking.tracking_uri:
        return tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(work_dir).resolve() / layout.MLFLOW_DB
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def configure(tracking: TrackingConfig, work_dir: str | Path) -> str:
    """Point MLflow at the store and experiment; returns the experiment id.

    The experiment is tagged as a training experiment (`EXPERIMENT_KIND_TAG`): untagged, MLflow 3's UI
    guesses its kind and opened this one on the GenAI overview (traces, tokens) instead of its runs.

    With a local sqlite store the experiment's artifacts go to `<work_dir>/mlruns` (absolute), so they
    do not depend on the working directory of whichever process logs them.
    """
    http_defaults()
    uri = resolve_tracking_uri(tracking, work_dir)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    with tracking_errors(uri):
        experiment = client.get_experiment_by_name(tracking.experiment)
        if experiment is not None:
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # a kind someone chose in the UI stays
                client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
            mlflow.set_experiment(experiment_id=experiment.experiment_id)
            return experiment.experiment_id
        artifact_location = tracking.artifact_location
        if artifact_location is None and uri.startswith("sqlite:"):
            artifact_location = (Path(work_dir).resolve() / layout.MLRUNS).as_uri()
        experiment_id = client.create_experiment(
            tracking.experiment,
            artifact_location=artifact_location,
            tags={EXPERIMENT_KIND_TAG: TRAINING_KIND},
        )
        mlflow.set_experiment(experiment_id=experiment_id)
        return experiment_id


def find_parent_run(experiment_id: str, pipeline_run_id: str) -> Run | None:
    """The pipeline's parent run: tagged with the pipeline run id and not itself nested."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'",
        order_by=["attributes.start_time ASC"],
    )
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    return parents[0] if parents else None


def ensure_parent_run(experiment_id: str, pipeline_run_id: str, run_name: str | None = None) -> str:
    """Find or create the parent run of a pipeline run; returns its id."""
    existing = find_parent_run(experiment_id, pipeline_run_id)
    if existing is not None:
        return existing.info.run_id
    run = MlflowClient().create_run(
        experiment_id,
        run_name=run_name or f"pipeline-{pipeline_run_id}",
        tags={PIPELINE_RUN_TAG: pipeline_run_id},
    )
    return run.info.run_id


def _end_stale_runs(experiment_id: str, pipeline_run_id: str, stage: str) -> None:
    """Mark as KILLED the runs an earlier attempt of this stage left RUNNING.

    A pod killed with SIGKILL (OOM, a lost node) cannot end its own run. Its retry, with the same
    pipeline run id, is the first process that knows the attempt is over.
    """
    client = MlflowClient()
    stale = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}' and tags.`{STAGE_TAG}` = '{stage}' "
            "and attributes.status = 'RUNNING'"
        ),
    )
    for run in stale:
        client.set_tag(run.info.run_id, "safe_rlhf_v.ended_by", "a later attempt of the same stage")
        client.set_terminated(run.info.run_id, status="KILLED")


def _set_parent_status(parent_id: str | None, status: str) -> None:
    """The parent run mirrors the pipeline: RUNNING while stages run, FAILED or KILLED when one
    does; `finish_pipeline` ends it FINISHED."""
    if parent_id is None:
        return
    client = MlflowClient()
    if status == "RUNNING":
        if client.get_run(parent_id).info.status != "RUNNING":
            client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status=status)


@contextmanager
def stage_run(
    stage: str, pipeline_run_id: str, tracking: TrackingConfig, work_dir: str | Path
) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one stage (resumed from `MLFLOW_RUN_ID` or nested under the pipeline).

    The run always ends: FINISHED when the block completes, FAILED on an exception, KILLED when the
    process is stopped (SystemExit from SIGTERM, Ctrl-C). The pipeline's parent run follows a failed
    or killed stage, so a dead pipeline never shows as RUNNING.
    """
    experiment_id = configure(tracking, work_dir)
    tags = {STAGE_TAG: stage, PIPELINE_RUN_TAG: pipeline_run_id}
    parent_id: str | None = None
    if os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()
        mlflow.set_tags(tags)
    else:
        parent_id = ensure_parent_run(experiment_id, pipeline_run_id)
        _end_stale_runs(experiment_id, pipeline_run_id, stage)
        _set_parent_status(parent_id, "RUNNING")
        tags["mlflow.parentRunId"] = parent_id
        run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags)
    try:
        yield run
    except Exception:
        mlflow.end_run("FAILED")
        _set_parent_status(parent_id, "FAILED")
        raise
    except BaseException:
        mlflow.end_run("KILLED")
        _set_parent_status(parent_id, "KILLED")
        raise
    mlflow.end_run("FINISHED")


def finish_pipeline(
    experiment_id: str, pipeline_run_id: str, headline: Mapping[str, float], description: str | None = None
) -> None:
    """End the pipeline's parent run FINISHED, with its headline figures, its duration and a markdown
    `description` (the registered versions as links).

    The last stage (register) calls this. Without it the parent of a successful run would stay
    RUNNING forever, with no figures to compare runs by in the MLflow UI.
    """
    parent = find_parent_run(experiment_id, pipeline_run_id)
    if parent is None:  # the KFP MLflow plugin owns the parent run
        return
    client = MlflowClient()
    now_ms = int(time.time() * 1000)
    for key, value in sorted(headline.items()):
        client.log_metric(parent.info.run_id, key, float(value), timestamp=now_ms)
    client.log_metric(parent.info.run_id, "pipeline_duration_s", (now_ms - parent.info.start_time) / 1000)
    if description:
        client.set_tag(parent.info.run_id, NOTE_TAG, description)
    client.set_terminated(parent.info.run_id, status="FINISHED", end_time=now_ms)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested settings into `a.b.c` keys with string values, as MLflow params want."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def log_config(section: BaseModel, prefix: str = "") -> None:
    """Log a config section as run params (MLflow caps values at 6000 chars; ours are short)."""
    mlflow.log_params(flatten(section.model_dump(mode="json"), prefix))


def log_dataset(
    *,
    name: str,
    source_uri: str,
    sha256: str,
    context: str,
    rows: int,
    extra_tags: Mapping[str, str] | None = None,
) -> None:
    """Record a data set input: name, source URI, digest (sha256 prefix) and the full sha256."""
    with warnings.catch_warnings():
        # A local path resolves to two equivalent source classes; MLflow warns and picks one.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(source_uri)
    dataset = MetaDataset(source=source, name=name, digest=sha256[:DIGEST_PREFIX_CHARS])
    tags = {"sha256": sha256, "rows": str(rows), "source_uri": source_uri, **(extra_tags or {})}
    mlflow.log_input(dataset, context=context, tags=tags)


def log_model_reference(role: str, uri: str, sha256: str) -> None:
    """Record a model the stage read or wrote (role e.g. `input.base_model`, `output.reward_model`)."""
    mlflow.set_tags({f"model.{role}.uri": uri, f"model.{role}.sha256": sha256})
