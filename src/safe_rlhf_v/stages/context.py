"""The stage context: everything a stage does around its own steps, written once.

Every stage runs the same frame: it needs a pipeline run id, it checks the output location before
any work starts, and it opens its MLflow run, which must end FINISHED, FAILED or KILLED. It fills a
local staging folder, records typed lineage and its `StageResult`, and publishes the folder
atomically at the end. `open_stage` owns that frame. A stage's `run()` keeps only its own steps:
load, train or evaluate, then `ctx.finish(...)`.

Output locations follow one rule, because a replaced output is a deleted one. `--out` may be:

* new;
* empty;
* a previous output of the same stage (it holds a `result.json` naming that stage), which is
  replaced as a whole.

Anything else is refused before the work starts, with the reason. That covers a folder of
unrelated files, an input of the stage, a folder holding an input, and the `work_dir` or its
bookkeeping (the MLflow store, caches, checkpoints, the checkpoint key). An `s3://` output is
probed with a small write first, so an unreachable or read-only bucket fails in seconds, not after
training.

Under `torchrun` every rank opens the context. Rank 0 alone tracks to MLflow and publishes; the
other ranks get `out=None` and a result without side effects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import signal
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar

import datasets
import mlflow
from pydantic import BaseModel

from safe_rlhf_v import storage, tracking
from safe_rlhf_v import work_dir as layout
from safe_rlhf_v.config import PipelineConfig
from safe_rlhf_v.data.sources import load_split
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.lineage import (
    dataset_digests,
    model_digest,
    validated_dataset_uri,
    write_lineage,
)
from safe_rlhf_v.records import RESULT_FILE, Lineage, ModelKind, StageName, StageResult, Variant

log = logging.getLogger(__name__)

SIGTERM_EXIT = 128 + signal.SIGTERM


class OutputLocationRefused(UserError, ValueError):
    """`--out` names a place whose contents are not this stage's to replace."""


def _local(uri: str) -> Path | None:
    """The absolute local path a URI names; None for S3 (and for hub ids, which name no folder)."""
    if storage.is_s3(uri):
        return None
    path = Path(uri.removeprefix("file://")).expanduser()
    return path.resolve() if path.is_absolute() or path.exists() else None


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _s3_within(uri: str, root: str) -> bool:
    a, b = uri.rstrip("/") + "/", root.rstrip("/") + "/"
    return a.startswith(b)


def _refuse_overlap(out: str, stage: str, inputs: Mapping[str, str]) -> None:
    """An output may neither sit inside an input nor hold one: replacing it would delete the input."""
    out_path = _local(out)
    for name, uri in inputs.items():
        if not uri:
            continue
        if out_path is None:
            overlap = storage.is_s3(uri) and (_s3_within(out, uri) or _s3_within(uri, out))
        else:
            in_path = _local(uri)
            overlap = in_path is not None and (_within(out_path, in_path) or _within(in_path, out_path))
        if overlap:
            raise OutputLocationRefused(
                f"--out {out} overlaps the {stage} input {name} ({uri}): publishing would replace it; "
                "choose a new folder"
            )


def _refuse_work_dir(out: Path, work_dir: Path) -> None:
    """The work dir holds the MLflow store, caches, checkpoints and the checkpoint key of every run."""
    if _within(work_dir, out):
        raise OutputLocationRefused(
            f"--out {out} is the work_dir {work_dir} or holds it; choose a folder inside it or elsewhere"
        )
    for name in layout.RESERVED:
        if _within(out, work_dir / name):
            raise OutputLocationRefused(
                f"--out {out} is inside {work_dir / name}, which the pipeline keeps for itself; choose "
                "another folder"
            )


def _previous_stage(out: str) -> str | None:
    """The stage named by a previous output's `result.json`; None when it holds none."""
    result = f"{out.rstrip('/')}/{RESULT_FILE}"
    if not storage.exists(result):
        return None
    try:
        return str(json.loads(storage.read_text(result)).get("stage"))
    except (json.JSONDecodeError, AttributeError):
        return "?"


def _refuse_foreign_content(out: str, stage: str) -> None:
    """Only an empty location or an earlier output of this very stage may be replaced."""
    local = _local(out)
    if local is not None and local.exists() and not local.is_dir():
        raise OutputLocationRefused(f"--out {out} is a file, not a folder; choose a folder")
    if not storage.exists(out):
        return
    previous = _previous_stage(out)
    if previous is None:
        count = len(storage.list_files(out))
        raise OutputLocationRefused(
            f"--out {out} already holds {count} file(s) that are not a {stage} output (no {RESULT_FILE}); "
            "nothing was changed: choose a new or empty folder"
        )
    if previous != stage:
        raise OutputLocationRefused(
            f"--out {out} holds a {previous} output, not a {stage} one; nothing was changed: choose "
            "another folder"
        )


def checked_output(out_uri: str, stage: str, inputs: Mapping[str, str], work_dir: str | Path) -> str:
    """`out_uri` made absolute, once it is known to be safe to publish to (see the module docstring)."""
    out = (
        out_uri
        if storage.is_s3(out_uri)
        else str(Path(out_uri.removeprefix("file://")).expanduser().resolve())
    )
    if storage.is_s3(out):
        storage.split_s3(out)
    else:
        _refuse_work_dir(Path(out), Path(work_dir).expanduser().resolve())
    _refuse_overlap(out, stage, inputs)
    _refuse_foreign_content(out, stage)
    storage.probe_write(out)
    return out


@contextmanager
def _staged(out_uri: str) -> Iterator[Path]:
    """A local folder to fill, published to `out_uri` (atomic rename, or upload) when the block ends
    without an exception; on one, the folder is discarded and `out_uri` is untouched."""
    if storage.is_s3(out_uri):
        with tempfile.TemporaryDirectory(prefix="stage-") as tmp:
            yield Path(tmp)
            storage.upload(Path(tmp), out_uri)
        return
    with storage.atomic_dir(Path(out_uri)) as tmp:
        yield tmp


def local_model(uri: str, work_dir: str | Path) -> str:
    """A model folder Hugging Face can load: `s3://` prefixes are downloaded once per node into
    `<work_dir>/cache/models/`; local folders and hub ids pass unchanged.

    Under torchrun (or a multi-node TrainJob) the first process of each node downloads and the
    others wait at a barrier, so a 7B model is fetched once per node, not once per GPU. Lineage keeps
    recording the original URI; only loading uses the local copy.
    """
    if not storage.is_s3(uri):
        return uri
    import torch.distributed as dist

    target = layout.model_cache(work_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not (target / "config.json").exists():
        storage.download(uri, target)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return str(target)


Settings = TypeVar("Settings")


def settings_from(section: BaseModel, settings: type[Settings], **given: Any) -> Settings:
    """A training loop's settings dataclass, filled from the config section's fields of the same
    names plus `given` (what is not in the section: the local model path, trust_remote_code).

    The loops take plain dataclasses, so they run without a pipeline config. Copying the fields by
    name keeps the stage from restating every knob, so a knob added to both cannot be forgotten.
    """
    names = {f.name for f in dataclasses.fields(settings)}  # type: ignore[arg-type]
    values = {name: getattr(section, name) for name in names & set(type(section).model_fields)}
    return settings(**(values | given))


def _sigterm_exits(signum: int, frame: FrameType | None) -> None:
    """Kubernetes stops a pod with SIGTERM: unwind (discarding staged outputs, ending the MLflow run
    as KILLED) instead of dying mid-write."""
    raise SystemExit(SIGTERM_EXIT)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into `SystemExit` for the block, unless another handler (a launcher, a test
    harness) already owns it or this is not the main thread, where Python cannot handle signals."""
    previous: Any = None
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            previous = signal.signal(signal.SIGTERM, _sigterm_exits)
    except ValueError:
        pass
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@dataclass
class StageContext:
    """One stage's frame: where it writes, its MLflow run, and how it finishes."""

    stage: StageName
    cfg: PipelineConfig
    out_uri: str | None
    pipeline_run_id: str
    main: bool
    mlflow_run_id: str | None = None
    out: Path | None = None
    _stack: ExitStack = field(default_factory=ExitStack)
    _output_kind: ModelKind | None = None

    @property
    def work_dir(self) -> Path:
        return Path(self.cfg.work_dir)

    def checkpoint_dir(self, name: str | None = None) -> Path:
        """Resume checkpoints: stable across retries of the same pipeline run, one folder per task."""
        return layout.checkpoints(self.work_dir, self.pipeline_run_id, name or self.stage)

    def checkpoint_key(self) -> bytes:
        # Imported here: the checkpoint code pulls in DeepSpeed, which only training stages need.
        from safe_rlhf_v.train.integrity import checkpoint_key

        return checkpoint_key(self.work_dir)

    def model(self, uri: str) -> str:
        """A loadable local copy of a model URI (see `local_model`)."""
        return local_model(uri, self.work_dir)

    def log_step(self, values: Mapping[str, float], step: int) -> None:
        """The training loops' metric sink: rank 0 logs to MLflow, other ranks drop the values."""
        if self.main:
            mlflow.log_metrics(dict(values), step=step)

    def load_validated(
        self, data_uri: str, splits: Sequence[str] = ("train", "evaluation")
    ) -> tuple[dict[str, str], dict[str, datasets.Dataset]]:
        """The digests and splits of a validate-data output, each split logged as an MLflow input."""
        digests = dataset_digests(data_uri)
        cache = layout.data_cache(self.work_dir)
        loaded = {
            split: load_split(validated_dataset_uri(data_uri), split, cache_dir=cache) for split in splits
        }
        if self.main:
            for split, rows in loaded.items():
                tracking.log_dataset(
                    name=f"beavertails-v/{split}",
                    source_uri=validated_dataset_uri(data_uri),
                    sha256=digests[split],
                    context="training" if split == "train" else "evaluation",
                    rows=len(rows),
                )
        return digests, loaded

    def lineage(
        self,
        kind: ModelKind,
        *,
        data_uri: str,
        digests: Mapping[str, str],
        base_model: str,
        variant: Variant | None = None,
        reward_model: str | None = None,
        cost_model: str | None = None,
    ) -> Lineage | None:
        """The typed lineage of the model this stage publishes, whose input models it also records
        as `input.*` tags on the run (rank 0; None on other ranks, which publish nothing and should
        not spend time hashing models)."""
        if not self.main or self.mlflow_run_id is None:
            return None
        uris = {"base_model": base_model, "reward_model": reward_model, "cost_model": cost_model}
        model_sha = {role: model_digest(uri) for role, uri in uris.items() if uri}
        for role, sha in model_sha.items():  # each model is hashed once, for the tags and the record
            tracking.log_model_reference(f"input.{role}", uris[role] or "", sha)
        return Lineage(
            stage=self.stage,
            kind=kind,
            pipeline_run_id=self.pipeline_run_id,
            mlflow_run_id=self.mlflow_run_id,
            data_uri=data_uri,
            data_sha256=dict(digests),  # type: ignore[arg-type]
            base_model=base_model,
            base_model_sha256=model_sha["base_model"],
            variant=variant,
            reward_model=reward_model,
            reward_model_sha256=model_sha.get("reward_model"),
            cost_model=cost_model,
            cost_model_sha256=model_sha.get("cost_model"),
        )

    def finish(
        self,
        metrics: Mapping[str, float],
        *,
        status: Literal["succeeded", "failed"] = "succeeded",
        lineage: Lineage | None = None,
        outputs: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
        files: Mapping[str, Any] | None = None,
        artifacts: Sequence[str] = (),
        artifact_path: str | None = None,
    ) -> StageResult:
        """Record the stage's result and publish its output folder.

        On rank 0 this writes `lineage.json` (when given), each of `files` as JSON, and
        `result.json` into the staging folder. It logs the metrics and the named `artifacts` (files
        in the staging folder) to MLflow, then publishes the folder. The `lineage.json`, `files`,
        `result.json` and artifact writes are skipped on the other ranks.
        """
        lineage_details = {"lineage": lineage.model_dump(exclude_none=True)} if lineage else {}
        result = StageResult(
            stage=self.stage,
            status=status,
            metrics=dict(metrics),
            outputs=dict(outputs or {}),
            details=dict(details or {}) | lineage_details,
            mlflow_run_id=self.mlflow_run_id,
            pipeline_run_id=self.pipeline_run_id,
        )
        if not self.main:
            return result
        mlflow.log_metrics(result.metrics)
        if self.out is None:
            return result
        if lineage is not None:
            write_lineage(self.out, lineage)
            self._output_kind = lineage.kind
        for name, payload in (files or {}).items():
            storage.atomic_write_text(
                self.out / name, json.dumps(payload, indent=2, sort_keys=True, default=str)
            )
        storage.atomic_write_text(self.out / RESULT_FILE, result.to_json())
        for name in artifacts:
            path = self.out / name
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=f"{artifact_path or self.stage}/{name}")
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path or self.stage)
        self._stack.close()  # publishes the staging folder
        self.out = None
        if self._output_kind is not None and self.out_uri is not None:
            tracking.log_model_reference(
                f"output.{self._output_kind}_model", self.out_uri, model_digest(self.out_uri)
            )
        return result


@contextmanager
def open_stage(
    stage: StageName,
    cfg: PipelineConfig,
    out_uri: str | None,
    *,
    inputs: Mapping[str, str],
    pipeline_run_id: str | None = None,
    run_name: str | None = None,
    distributed: bool = False,
) -> Iterator[StageContext]:
    """Open a stage: check `out_uri`, join the process group when `distributed`, open the MLflow run
    (rank 0), and stage the output folder. The block must end with `ctx.finish(...)`; leaving it
    by an exception discards the staged folder and ends the MLflow run as FAILED (KILLED on SIGTERM
    or Ctrl-C)."""
    out = checked_output(out_uri, stage, inputs, cfg.work_dir) if out_uri else None
    if distributed:
        # Imported here: DeepSpeed is slow to import and chatty, and single-process stages never need it.
        from safe_rlhf_v.train.distributed import init_distributed

        main = init_distributed().rank == 0
    else:
        main = True
    ctx = StageContext(
        stage=stage,
        cfg=cfg,
        out_uri=out,
        pipeline_run_id=pipeline_run_id or f"local-{uuid.uuid4().hex[:12]}",
        main=main,
    )
    with _sigterm_as_exit(), ExitStack() as frame:
        if main:
            mlrun = frame.enter_context(
                tracking.stage_run(run_name or stage, ctx.pipeline_run_id, cfg.tracking, cfg.work_dir)
            )
            ctx.mlflow_run_id = mlrun.info.run_id
            if out is not None:
                ctx.out = ctx._stack.enter_context(_staged(out))
        with ctx._stack:
            yield ctx
            if ctx.out is not None:
                raise RuntimeError(f"stage {stage} ended without ctx.finish(): nothing was published")
