"""Operate the pipeline on a Kubeflow Pipelines server through `kfp.Client` (the v2beta1 REST API).

* `upload`: the compiled YAML becomes a version of the pipeline, so the UI's "Create run" offers
  it. A missing pipeline is first created empty, so every version, the first included, is named
  `<package version>-<content hash>`: uploading an unchanged spec again is a no-op, never a
  duplicate (uploading a new pipeline with its spec would name that first version after the
  pipeline, and the next upload of the same spec would add it again under its hash).
* `submit`: one run of the pipeline's latest version, with parameters from a YAML file that are
  checked against that version's own parameter list and sent as JSON values of the declared
  types, before anything is created.
* `schedule`: a recurring run that names the pipeline but no version, so every trigger runs the
  latest version at that time (backend >= 2.5, kubeflow/pipelines#11560) and an upload never
  leaves the schedule on stale code; max concurrency 1, no catch-up, enabled. Idempotent per
  name and experiment, so a CronJob may run it on every deploy (manifests/base/retrain-cronjob.yaml).
* `recent_runs`: the newest runs with their states, for a status table.

The host comes from the caller or `KFP_HOST`, a bearer token only from `KFP_TOKEN` (never a flag,
which would end up in shell history and process listings) or, in a pod, from the projected
service-account token of KFP's audience; the token is never printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import kfp
import kfp_server_api
import urllib3
import yaml
from kfp_server_api.exceptions import ApiException

from safe_rlhf_v import __version__
from safe_rlhf_v.config import PipelineConfig, parse_yaml
from safe_rlhf_v.errors import UserError

HOST_ENV = "KFP_HOST"
TOKEN_ENV = "KFP_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
"""Where a pod's service-account token for the `pipelines.kubeflow.org` audience is projected
(kfp's own default), used when `KFP_TOKEN` is unset."""

_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "STRING": (str,),
    "NUMBER_INTEGER": (int,),
    "NUMBER_DOUBLE": (int, float),
    "BOOLEAN": (bool,),
    "LIST": (list,),
    "STRUCT": (dict,),
}
"""KFP parameter types and the YAML values each accepts (bool is never a number here)."""


SPEC_DIGEST_PREFIX = "settings sha256:"
"""Marks the digest of a recurring run's settings at the end of its description (see `schedule`)."""


class KfpOpsError(UserError, ValueError):
    """A request the KFP API cannot serve as asked (bad host, unknown parameter, missing pipeline).

    A UserError, so the CLI reports it as one line naming the problem instead of a traceback.
    """


def compile_pipeline(
    cfg: PipelineConfig, package: Path, config: str, overrides: list[str] | None = None
) -> Path:
    """Compile the pipeline for `cfg` to `package` (YAML: pipeline spec, then the platform spec).

    `config` and `overrides` become the defaults of the run form's `config` and `config_overrides`
    (see `build_pipeline`).
    """
    from kfp import compiler

    from safe_rlhf_v.pipelines.safe_rlhf_v import build_pipeline

    package.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cfg, config, overrides), package_path=str(package))
    _integer_defaults_as_integers(package)
    return package


def _integer_defaults_as_integers(package: Path) -> None:
    """Write the defaults of integer pipeline parameters as integers (`0`, not `0.0`).

    KFP stores every number as a protobuf double, so the compiled YAML and the Kubeflow run form
    show an int parameter's default as `0.0`. The spec reads either form back as the same number.
    """
    text = package.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    documents = list(yaml.safe_load_all(text))
    parameters = documents[0]["root"].get("inputDefinitions", {}).get("parameters", {})
    for name, parameter in parameters.items():
        default = parameter.get("defaultValue")
        if (
            parameter["parameterType"] == "NUMBER_INTEGER"
            and isinstance(default, float)
            and default.is_integer()
        ):
            parameter["defaultValue"] = int(default)
            header = header.replace(
                f"#    {name}: int [Default: {default}]", f"#    {name}: int [Default: {int(default)}]"
            )
    package.write_text(header + yaml.dump_all(documents, sort_keys=True), encoding="utf-8")


def version_name_for(package: Path) -> str:
    """`<package version>-<first 10 hex of the YAML's sha256>`: equal content, equal name."""
    return f"{__version__}-{hashlib.sha256(package.read_bytes()).hexdigest()[:10]}"


def read_params(path: Path) -> dict[str, Any]:
    """Run parameters from a YAML mapping of parameter name to value."""
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KfpOpsError(f"parameter file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise KfpOpsError(f"parameter file {path} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(key, str) for key in raw):
        raise KfpOpsError(f"parameter file {path} must hold a mapping of parameter name to value")
    return raw


def kfp_cron(expression: str) -> str:
    """KFP's 6-field cron (seconds first, robfig/cron) from a 5-field crontab line or a 6-field one.

    `0 3 * * 0` (Sundays 03:00) becomes `0 0 3 * * 0`; passed as is, KFP would read its fields
    shifted by one (minute 3 of every hour, month 0).
    """
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise KfpOpsError(
        f"cron {expression!r} has {len(fields)} fields: give 5 (minute hour day month weekday, "
        "e.g. '0 3 * * 0') or 6 with seconds first"
    )


@dataclass(frozen=True)
class Uploaded:
    """What `upload` did: created the pipeline, added a version, or found this version there."""

    pipeline_id: str
    version_id: str
    version_name: str
    action: Literal["created pipeline", "new version", "already uploaded"]


@dataclass(frozen=True)
class Scheduled:
    """What `schedule` did: created the recurring run, replaced one with other settings, or kept it."""

    recurring_run_id: str
    action: Literal["created", "replaced", "unchanged"]
    status: str


@dataclass(frozen=True)
class PipelineVersion:
    """A pipeline version and its run parameters (`root.inputDefinitions.parameters` of its spec)."""

    pipeline_id: str
    version_id: str
    name: str
    parameters: Mapping[str, Mapping[str, Any]]

    def runtime_parameters(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """`params` checked against this version and encoded as the JSON values the API stores.

        The API server keeps each value as JSON and KFP's driver parses it back by the declared
        type, so a value that JSON cannot carry (a YAML date, NaN) or of another type fails here,
        naming the parameter, instead of in a run days later. NUMBER_DOUBLE values become floats.
        """
        self.check(params)
        encoded = {}
        for name, value in params.items():
            if self.parameters[name].get("parameterType") == "NUMBER_DOUBLE":
                value = float(value)
            try:
                encoded[name] = json.loads(json.dumps(value, allow_nan=False))
            except (TypeError, ValueError):
                raise KfpOpsError(
                    f"parameter {name}: {value!r} ({type(value).__name__}) is not a JSON value; "
                    "quote it in the parameter file to pass it as a string"
                ) from None
        return encoded

    def check(self, params: Mapping[str, Any]) -> None:
        """Reject unknown names, missing required parameters and values of the wrong type, all at once."""
        problems = []
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            problems.append(f"unknown parameter(s) {', '.join(unknown)}")
        for name, spec in sorted(self.parameters.items()):
            kind = spec.get("parameterType", "")
            if name not in params:
                if "defaultValue" not in spec and not spec.get("isOptional", False):
                    problems.append(f"{name} ({kind}) is required")
                continue
            value, accepted = params[name], _PYTHON_TYPES.get(kind, (object,))
            if isinstance(value, bool) != (kind == "BOOLEAN") or not isinstance(value, accepted):
                problems.append(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
        if problems:
            listed = ", ".join(
                f"{n} ({s.get('parameterType', '?')})" for n, s in sorted(self.parameters.items())
            )
            raise KfpOpsError(
                f"parameters for pipeline version {self.name}: {'; '.join(problems)}. "
                f"The pipeline's parameters are: {listed or 'none'}"
            )


@dataclass(frozen=True)
class RunRow:
    """One line of the `runs` table."""

    name: str
    state: str
    created: datetime | None
    finished: datetime | None
    run_id: str


def _name_filter(name: str) -> str:
    """The v2beta1 list filter `display_name == name` (a JSON-serialised Filter message)."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _root_parameters(spec: Mapping[str, Any] | None) -> Mapping[str, Mapping[str, Any]]:
    """Parameters of a stored spec; the server nests it under `pipeline_spec` when a platform spec exists."""
    spec = spec or {}
    if "pipeline_spec" in spec:
        spec = spec["pipeline_spec"]
    return spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})


@contextlib.contextmanager
def _calling(host: str, what: str) -> Iterator[None]:
    """Turn transport and API errors into one line naming the host, the request and the answer."""
    try:
        yield
    except urllib3.exceptions.HTTPError as error:
        reason = getattr(error, "reason", None) or error
        raise KfpOpsError(f"cannot reach the Kubeflow Pipelines API at {host} ({what}): {reason}") from None
    except TimeoutError as error:  # kfp.Client gives up on an unhealthy healthz endpoint
        raise KfpOpsError(f"the Kubeflow Pipelines API at {host} is not healthy ({what}): {error}") from None
    except ApiException as error:
        raise KfpOpsError(f"{what} failed at {host}: {_api_message(error)}") from None


class PipelineOps:
    """The four operations against one KFP API host."""

    def __init__(self, client: kfp.Client, host: str) -> None:
        self.client = client
        self.host = host

    @classmethod
    def connect(cls, host: str | None = None) -> PipelineOps:
        """Connect to `host` (else `KFP_HOST`) with the bearer token in `KFP_TOKEN`, if any."""
        host = host or os.environ.get(HOST_ENV)
        if not host:
            raise KfpOpsError(f"no Kubeflow Pipelines host: pass --host URL or set {HOST_ENV}")
        token = os.environ.get(TOKEN_ENV) or None
        credentials = None
        if token is None and Path(os.environ.get(SA_TOKEN_PATH_ENV, SA_TOKEN_PATH)).is_file():
            # In a pod (the retrain CronJob): the projected token for KFP's audience, which kfp
            # re-reads before every request, so the kubelet's rotation never breaks a long call.
            credentials = kfp.client.ServiceAccountTokenVolumeCredentials()
        with _calling(host, "connect"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="This client only works with Kubeflow Pipeline")
            client = kfp.Client(host=host, existing_token=token, credentials=credentials)
        return cls(client, host)

    def _calling(self, what: str) -> contextlib.AbstractContextManager[None]:
        return _calling(self.host, what)

    # --- pipelines and versions --------------------------------------------------------------------

    def pipeline_id(self, pipeline_name: str) -> str | None:
        """The id of the pipeline with this display name, or None."""
        with self._calling(f"find pipeline {pipeline_name}"):
            return self.client.get_pipeline_id(pipeline_name)

    def upload(
        self,
        package: Path,
        *,
        pipeline_name: str,
        version_name: str | None = None,
        description: str | None = None,
    ) -> Uploaded:
        """Upload `package` as a version of pipeline `pipeline_name`, creating the pipeline empty first.

        An existing version of the same name is returned as is: the default name carries the
        content hash, so the same spec is never stored twice.
        """
        version_name = version_name or version_name_for(package)
        pipeline_id = self.pipeline_id(pipeline_name)
        created = pipeline_id is None
        if pipeline_id is None:
            pipeline_id = self._create_pipeline(pipeline_name, description)
        with self._calling(f"list versions of {pipeline_name}"):
            found = self.client.list_pipeline_versions(
                pipeline_id, page_size=1, filter=_name_filter(version_name)
            )
        if found.pipeline_versions:
            return Uploaded(
                pipeline_id, found.pipeline_versions[0].pipeline_version_id, version_name, "already uploaded"
            )
        with self._calling(f"upload version {version_name} of {pipeline_name}"):
            version = self.client.upload_pipeline_version(
                str(package), version_name, pipeline_id=pipeline_id, description=description
            )
        action: Literal["created pipeline", "new version"] = "created pipeline" if created else "new version"
        return Uploaded(pipeline_id, version.pipeline_version_id, version_name, action)

    def _create_pipeline(self, pipeline_name: str, description: str | None) -> str:
        """Create the pipeline with no version; its id. One another upload created meanwhile is reused."""
        body = kfp_server_api.V2beta1Pipeline(display_name=pipeline_name, description=description)
        try:
            with self._calling(f"create pipeline {pipeline_name}"):
                return self.client.pipelines.pipeline_service_create_pipeline(pipeline=body).pipeline_id
        except KfpOpsError:
            pipeline_id = self.pipeline_id(pipeline_name)
            if pipeline_id is None:
                raise
            return pipeline_id

    def latest_version(self, pipeline_name: str) -> PipelineVersion:
        """The newest version of the pipeline, with its parameters."""
        pipeline_id = self.pipeline_id(pipeline_name)
        if pipeline_id is None:
            raise KfpOpsError(
                f"no pipeline named {pipeline_name} at {self.host}: run `safe-rlhf-v upload` first"
            )
        return self._latest(pipeline_id, pipeline_name)

    def _latest(self, pipeline_id: str, pipeline_name: str) -> PipelineVersion:
        with self._calling(f"find the latest version of {pipeline_name}"):
            listed = self.client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
            if not listed.pipeline_versions:
                raise KfpOpsError(f"pipeline {pipeline_name} ({pipeline_id}) has no versions")
            version_id = listed.pipeline_versions[0].pipeline_version_id
            version = self.client.get_pipeline_version(pipeline_id, version_id)
        return PipelineVersion(
            pipeline_id, version_id, version.display_name, _root_parameters(version.pipeline_spec)
        )

    # --- runs --------------------------------------------------------------------------------------

    def experiment_id(self, experiment: str, *, create: bool) -> str:
        """The experiment's id; created when missing if `create`, else an error."""
        with self._calling(f"find experiment {experiment}"):
            if create:
                return self.client.create_experiment(experiment).experiment_id
            try:
                return self.client.get_experiment(experiment_name=experiment).experiment_id
            except ValueError:
                raise KfpOpsError(f"no experiment named {experiment} at {self.host}") from None

    def submit(
        self,
        *,
        pipeline_name: str,
        params: Mapping[str, Any],
        experiment: str,
        run_name: str | None = None,
        service_account: str | None = None,
    ) -> str:
        """Start a run of the latest version with `params` in `experiment` (created if missing); its id."""
        version = self.latest_version(pipeline_name)
        parameters = version.runtime_parameters(params)
        experiment_id = self.experiment_id(experiment, create=True)
        name = run_name or f"{pipeline_name} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}"
        with self._calling(f"create run {name}"):
            run = self.client.run_pipeline(
                experiment_id,
                name,
                params=parameters,
                pipeline_id=version.pipeline_id,
                version_id=version.version_id,
                service_account=service_account,
            )
        return run.run_id

    def schedule(
        self,
        *,
        pipeline_name: str,
        cron: str,
        name: str,
        params: Mapping[str, Any],
        experiment: str,
        service_account: str | None = None,
    ) -> Scheduled:
        """Make sure one enabled recurring run `name` of the pipeline's latest version exists as asked.

        `params` are checked against today's latest version. The API cannot change a recurring run,
        so its description ends with the digest of its settings: a run of this name and experiment
        with the same digest is kept (also when someone disabled it, to pause retraining); one with
        other settings is deleted and created anew, and extra runs of the name are deleted, so
        repeating the call never doubles a retrain.
        """
        trigger_cron = kfp_cron(cron)
        version = self.latest_version(pipeline_name)
        parameters = version.runtime_parameters(params)
        experiment_id = self.experiment_id(experiment, create=True)
        settings = {
            "pipeline_id": version.pipeline_id,
            "cron": trigger_cron,
            "parameters": parameters,
            "service_account": service_account,
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        description = (
            f"Retrain {pipeline_name} on cron {trigger_cron} (latest pipeline version); "
            f"{SPEC_DIGEST_PREFIX}{digest}"
        )
        with self._calling(f"list recurring runs named {name}"):
            listed = self.client.list_recurring_runs(
                experiment_id=experiment_id, filter=_name_filter(name), page_size=100
            )
        existing = listed.recurring_runs or []
        keep = next(
            (r for r in existing if (r.description or "").endswith(SPEC_DIGEST_PREFIX + digest)), None
        )
        for stale in existing:
            if stale is not keep:
                with self._calling(f"delete recurring run {name} ({stale.recurring_run_id})"):
                    self.client.delete_recurring_run(stale.recurring_run_id)
        if keep is not None:
            return Scheduled(keep.recurring_run_id, "unchanged", keep.status or "UNKNOWN")
        body = kfp_server_api.V2beta1RecurringRun(
            display_name=name,
            description=description,
            pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
                pipeline_id=version.pipeline_id
            ),
            runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=parameters),
            trigger=kfp_server_api.V2beta1Trigger(
                cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=trigger_cron)
            ),
            mode=kfp_server_api.RecurringRunMode.ENABLE,
            max_concurrency="1",  # int64 travels as a JSON string in the v2beta1 API
            no_catchup=True,
            experiment_id=experiment_id,
            service_account=service_account,
        )
        # kfp.Client.create_recurring_run insists on a version id; the generated API does not.
        with self._calling(f"create recurring run {name}"):
            created = self.client.recurring_runs.recurring_run_service_create_recurring_run(
                recurring_run=body
            )
        action: Literal["created", "replaced"] = "replaced" if existing else "created"
        return Scheduled(created.recurring_run_id, action, created.status or "ENABLED")

    def recent_runs(self, *, limit: int = 10, experiment: str | None = None) -> list[RunRow]:
        """The newest `limit` runs (of one experiment, if named), newest first."""
        if limit < 1:
            raise KfpOpsError(f"--limit must be at least 1, got {limit}")
        experiment_id = self.experiment_id(experiment, create=False) if experiment else None
        with self._calling("list runs"):
            listed = self.client.list_runs(
                page_size=limit, sort_by="created_at desc", experiment_id=experiment_id
            )
        return [
            RunRow(
                name=run.display_name or "",
                state=run.state or "UNKNOWN",
                created=run.created_at,
                finished=_finished(run.finished_at),
                run_id=run.run_id or "",
            )
            for run in listed.runs or []
        ]


def _finished(at: datetime | None) -> datetime | None:
    """The API reports an unfinished run's `finished_at` as the Unix epoch."""
    return None if at is None or at.timestamp() <= 0 else at


def _api_message(error: ApiException) -> str:
    """`HTTP 404 Not Found: <the server's message>`."""
    detail = error.body
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        parsed = json.loads(error.body)
        detail = parsed.get("message") or parsed.get("error") or detail
    return f"HTTP {error.status} {error.reason}: {detail}"


def format_runs(rows: list[RunRow]) -> str:
    """A fixed-width table: NAME, STATE, CREATED, FINISHED (UTC), RUN ID."""
    if not rows:
        return "no runs"

    def when(at: datetime | None) -> str:
        return "-" if at is None else at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    table = [("NAME", "STATE", "CREATED (UTC)", "FINISHED (UTC)", "RUN ID")]
    table += [(r.name, r.state, when(r.created), when(r.finished), r.run_id) for r in rows]
    widths = [max(len(row[col]) for row in table) for col in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    )
