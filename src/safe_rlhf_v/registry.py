"""The MLflow Model Registry side of the pipeline: register a run's models, promote through aliases.

A pipeline run produces four models (policy, reward, cost, guard). `register_run_models` logs each
as an MLflow 3 logged model (a `python_function` model with a signature and a model card that
references the safetensors folder, see `mlflow_models`) and registers that as a version of its
registered model: the version's `source` is the logged model (`models:/<model id>`), so
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")` works, its `model_folder` tag is the folder's own
location (an `s3://` URI in a cluster, an absolute folder locally), and its `run_id` is the training
stage's MLflow run, so the UI links a version to the run that made it. Tags carry the lineage a
reviewer needs without opening anything else: the pipeline run, the data digests, the base model
and model digests, the upstream model versions the policy was trained and evaluated with, and the
headline evaluation figures.

Registration is keyed by content and lineage: bytes already registered under a model name get that
version back (no new version, no alias moved), and a pipeline run id other than the one that trained
and evaluated the policy is refused.

Promotion moves the `staging` or `production` alias to a policy version only after a gate on those
figures: the cost budget; the harmful share's upper confidence bound by the most trusted judge the
evaluation had (the synthetic world's exact judge, else an external judge, else the cost model); the
learned judges agreeing with that judge in direction; reward not below the current holder. And
`production` only takes a version that passed `staging` unforced (`promotion.requires_passed`).
`force` overrides the gate and that order with a recorded reason. Every promotion leaves a numbered
record of tags on the version: who, when, which alias, the gate figures and whether each check passed.
"""

from __future__ import annotations

import getpass
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import mlflow
from mlflow.entities import LoggedModelInput
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from safe_rlhf_v import mlflow_models, storage, tracking
from safe_rlhf_v.config import HarmJudge, PipelineConfig, PromotionAlias, ShareBound
from safe_rlhf_v.errors import UserError
from safe_rlhf_v.lineage import SPLITS, model_digest, read_lineage
from safe_rlhf_v.records import LINEAGE_FILE, MAIN_VARIANT, RESULT_FILE, StageResult

Role = Literal["policy", "reward", "cost", "guard"]
ROLES: tuple[Role, ...] = ("reward", "cost", "guard", "policy")
"""Registration order: upstream models first, so the policy's tags can name their versions."""
TRAINED_BY: dict[Role, str] = {
    "policy": "train-ppo-lag",
    "reward": "train-reward",
    "cost": "train-cost",
    "guard": "train-guard",
}
PROMOTION_TARGETS: tuple[PromotionAlias, ...] = get_args(PromotionAlias)

REWARD_KEY = "evaluation/trained/reward"
COST_KEY = "evaluation/trained/cost"
HARMFUL_SHARE_KEY = "evaluation/trained/harmful_share"
HARMFUL_SHARE_UPPER_KEY = f"{HARMFUL_SHARE_KEY}_upper"
HEADLINE_METRICS = (
    REWARD_KEY,
    COST_KEY,
    HARMFUL_SHARE_KEY,
    "evaluation/initial/reward",
    "evaluation/initial/cost",
    "evaluation/initial/harmful_share",
    "evaluation/win_rate/helpfulness",
    "evaluation/win_rate/harmlessness",
    HARMFUL_SHARE_UPPER_KEY,
)
"""The evaluate stage's figures every policy version carries as tags (under the same names)."""
TRUTH_SHARE_KEY = "evaluation/trained/truth/harmful_share"
EXTERNAL_SHARE_KEY = "evaluation/external/less_safe_share"
JUDGES_DISAGREE_KEY = "evaluation/judges_disagree"
JUDGE_METRICS = (
    TRUTH_SHARE_KEY,
    f"{TRUTH_SHARE_KEY}_upper",
    EXTERNAL_SHARE_KEY,
    f"{EXTERNAL_SHARE_KEY}_upper",
    JUDGES_DISAGREE_KEY,
    "evaluation/truth/win_rate/helpfulness",
    "evaluation/external/win_rate/helpfulness",
)
"""Figures of the judges that cannot be gamed, tagged when the evaluation had them."""
HARM_JUDGES = (
    ("ground truth", TRUTH_SHARE_KEY),
    ("external judge", EXTERNAL_SHARE_KEY),
    ("cost model", HARMFUL_SHARE_KEY),
)
"""The gate's judges of harm in order of trust: the first whose figure a version carries decides."""

PIPELINE_RUN_TAG = "pipeline_run_id"
MODEL_SHA_TAG = "model_sha256"
FOLDER_TAG = mlflow_models.FOLDER_TAG
UPSTREAM_TAG = "{role}_model_version"
"""The policy version's tag naming the reward, cost or guard version it was trained and evaluated with."""
_POLICY_LINEAGE = ("variant", "reward_model_sha256", "cost_model_sha256")
_RECORD_RE = re.compile(r"^promotion\.(\d+)\.")


class RegistryError(UserError, ValueError):
    """What was asked of the registry cannot be done; the message names the model, version or file."""


class PromotionRefused(RegistryError):
    """The promotion gate failed; `checks` holds every check with its figures."""

    def __init__(self, model: str, version: str, alias: str, checks: list[GateCheck]) -> None:
        failed = [check for check in checks if not check.passed]
        lines = [f"promotion of {model} version {version} to {alias!r} refused:"]
        lines += [f"  - {check.name}: {check.detail}" for check in failed]
        lines.append("pass --force with --reason TEXT to promote anyway (the reason is recorded)")
        super().__init__("\n".join(lines))
        self.checks = checks


@dataclass(frozen=True)
class ModelVersionRef:
    """One registered version: where it points, whether this call created it, who registered it."""

    name: str
    version: str
    source: str
    """The model folder (or `s3://` prefix) the version's logged model references."""
    created: bool
    model_sha256: str
    registered_in: str
    """The pipeline run whose registration made the version (an earlier one when `created` is False)."""
    alias: str | None = None
    """The alias this registration pointed at the version; None when it moved none."""
    model_id: str | None = None
    """The MLflow 3 logged model the version is (None for a version registered as a bare folder)."""

    @property
    def uri(self) -> str:
        """The MLflow model URI (`models:/name/version`) other tools load the version by."""
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class GateLimits:
    """The promotion gate's limits, resolved from the config."""

    cost_threshold: float
    max_harmful_share: float
    min_reward_delta: float
    judge: HarmJudge = "reference"
    bound: ShareBound = "upper"


@dataclass(frozen=True)
class GateCheck:
    """One gate check: the figure, the limit it was held to, the outcome and a readable line."""

    name: str
    figure: float | None
    limit: float | None
    passed: bool
    detail: str


@dataclass(frozen=True)
class PromotionResult:
    """What a promotion did: the alias moved to `version`, away from `previous_version`."""

    model: str
    version: str
    alias: str
    previous_version: str | None
    checks: list[GateCheck]
    forced: bool
    reason: str | None
    user: str
    time: str
    record: int
    """The number of this promotion's record in the version's `promotion.<n>.*` tags."""


@dataclass(frozen=True)
class VersionInfo:
    """A row of `safe-rlhf-v models`."""

    name: str
    version: str
    aliases: tuple[str, ...]
    source: str
    pipeline_run_id: str | None
    created: str
    figures: dict[str, float]
    ungated: tuple[str, ...] = ()
    """Gate aliases (`staging`, `production`) the version holds without a promotion record for them:
    moved outside `promote`, e.g. with the MLflow UI's alias editor, so no gate passed."""


# ----------------------------------------------------------------------------- tracking access


def client_for(cfg: PipelineConfig) -> tuple[MlflowClient, str]:
    """A client on the store the stages track to (same resolution as `tracking.configure`) and its URI.

    No experiment is created or selected: promotion and listing only touch the registry.
    """
    tracking.http_defaults()
    uri = tracking.resolve_tracking_uri(cfg.tracking, cfg.work_dir)
    return MlflowClient(uri), uri


def _not_found(error: MlflowException) -> bool:
    return error.error_code == "RESOURCE_DOES_NOT_EXIST"


def _literal(value: str) -> str:
    """A quoted string for an MLflow search filter, which has no escape for a quote inside."""
    if "'" in value:
        raise RegistryError(f"{value!r} contains a single quote, which MLflow search filters cannot express")
    return f"'{value}'"


def _versions_of(client: MlflowClient, name: str) -> list[ModelVersion]:
    found = client.search_model_versions(f"name = {_literal(name)}")
    return sorted(found, key=lambda version: int(version.version))


def _registered_model_aliases(client: MlflowClient, name: str, uri: str) -> dict[str, str]:
    """Alias -> version of a registered model; a RegistryError listing the known models if unknown."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if not _not_found(error):
            raise
        known = sorted(found.name for found in client.search_registered_models())
        raise RegistryError(
            f"no registered model named {name!r} in {uri}; registered models: {', '.join(known) or 'none'}"
        ) from None
    return {alias: str(version) for alias, version in model.aliases.items()}


def _model_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        known = [found.version for found in _versions_of(client, name)]
        raise RegistryError(
            f"registered model {name!r} has no version {version!r}; "
            f"its versions: {', '.join(str(v) for v in known) or 'none'}"
        ) from None


# ------------------------------------------------------------------------------- registration


def source_uri(uri: str) -> str:
    """The `source` a version records: an S3 URI as given, a local folder as an absolute path.

    A relative path means nothing to anyone reading the registry from elsewhere, and other schemes
    are refused so the source is always one of the two forms the pipeline's storage layer reads.
    """
    if storage.is_s3(uri):
        storage.split_s3(uri)  # refuses a URI without a bucket name
        return uri.rstrip("/")
    if "://" in uri:
        raise RegistryError(f"model location {uri!r} is neither a local folder nor an s3:// URI")
    return str(Path(uri).resolve())


def read_model_lineage(role: Role, uri: str) -> dict[str, Any]:
    """The `lineage.json` of a model folder, checked to be a complete record of the right stage."""
    if not storage.exists(uri):
        raise RegistryError(f"no {role} model folder at {uri}")
    where = f"{uri.rstrip('/')}/{LINEAGE_FILE}"
    record = read_lineage(uri)
    if record is None:
        raise RegistryError(f"{where} is missing: {uri} is not a {TRAINED_BY[role]} output")
    lineage = record.model_dump()
    required = _POLICY_LINEAGE if role == "policy" else ()
    missing = [key for key in required if not lineage.get(key)]
    missing += [f"data_sha256.{split}" for split in SPLITS if not lineage["data_sha256"].get(split)]
    if missing:
        raise RegistryError(f"{where} lacks {', '.join(missing)}")
    if lineage["kind"] != role:
        raise RegistryError(
            f"{where} describes a {lineage['kind']!r} model, not a {role!r} model: "
            f"pass the {TRAINED_BY[role]} output as the {role} model"
        )
    if role == "policy" and lineage["variant"] != MAIN_VARIANT:
        raise RegistryError(
            f"{where}: the policy is the {lineage['variant']!r} ablation; only the {MAIN_VARIANT!r} policy "
            "is registered"
        )
    return lineage


def read_evaluation(uri: str) -> StageResult:
    """The evaluate stage's result, checked to have succeeded and to hold every headline figure."""
    path = f"{uri.rstrip('/')}/{RESULT_FILE}"
    if not storage.exists(path):
        raise RegistryError(f"{path} is missing: {uri} is not an evaluate output")
    result = StageResult.from_json(storage.read_text(path), path)
    if result.status != "succeeded":
        raise RegistryError(f"{path}: the evaluation {result.status}; only a succeeded one can be registered")
    missing = [key for key in HEADLINE_METRICS if key not in result.metrics]
    if missing:
        raise RegistryError(f"{path} lacks the metrics {', '.join(missing)}")
    for key in HEADLINE_METRICS:
        value = result.metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RegistryError(f"{path}: metric {key} is {value!r}, not a number")
    return result


def _check_upstream(policy: Mapping[str, Any], role: Role, digest: str, uri: str) -> None:
    """The policy's lineage names the digest of the reward/cost model it was trained against; the
    folder being registered as its upstream must be that very model, or the tags would lie."""
    recorded = policy[f"{role}_model_sha256"]
    if recorded != digest:
        raise RegistryError(
            f"the policy was trained against a {role} model with sha256 {recorded}, but {uri} has sha256 "
            f"{digest}: pass the {role} model the policy was trained with"
        )


def _lineage_tags(lineage: Mapping[str, Any], pipeline_run_id: str, digest: str) -> dict[str, str]:
    tags = {
        PIPELINE_RUN_TAG: pipeline_run_id,
        "trained_in_pipeline_run_id": str(lineage["pipeline_run_id"]),
        "stage": str(lineage.get("stage", "")),
        "data_uri": str(lineage.get("data_uri", "")),
        "base_model": str(lineage.get("base_model", "")),
        "base_model_sha256": str(lineage["base_model_sha256"]),
        MODEL_SHA_TAG: digest,
    }
    tags |= {f"data_sha256.{split}": str(lineage["data_sha256"][split]) for split in SPLITS}
    return {key: value for key, value in tags.items() if value}


def _policy_tags(
    upstream: Mapping[str, ModelVersionRef], evaluation: StageResult, evaluation_uri: str
) -> dict[str, str]:
    tags = {UPSTREAM_TAG.format(role=role): ref.uri for role, ref in upstream.items()}
    tags |= {key: repr(float(evaluation.metrics[key])) for key in HEADLINE_METRICS}
    tags |= {key: repr(float(evaluation.metrics[key])) for key in JUDGE_METRICS if key in evaluation.metrics}
    tags |= {"variant": MAIN_VARIANT, "evaluation_uri": source_uri(evaluation_uri)}
    if evaluation.mlflow_run_id:
        tags["evaluation_run_id"] = evaluation.mlflow_run_id
    return tags


def _check_same_run(
    policy: Mapping[str, Any],
    evaluation: StageResult,
    pipeline_run_id: str,
    policy_uri: str,
    evaluation_uri: str,
) -> None:
    """A registration speaks for the pipeline run that trained and evaluated the policy.

    Under any other id the versions would be tagged with a run that never made them, and `candidate`
    would move on its word; an evaluation from another run would put another policy's figures on
    this one, and the promotion gate reads nothing else. The reward, cost and guard models are not
    held to the id: a run may reuse one trained earlier, and registration by content gives such a
    model its existing version back.
    """
    trained_in = str(policy["pipeline_run_id"])
    if trained_in != pipeline_run_id:
        raise RegistryError(
            f"pipeline run id {pipeline_run_id!r} contradicts {policy_uri.rstrip('/')}/{LINEAGE_FILE}, "
            f"which says the policy was trained in pipeline run {trained_in!r}: register under "
            f"{trained_in!r} (omit --pipeline-run-id)"
        )
    if evaluation.pipeline_run_id != pipeline_run_id:
        raise RegistryError(
            f"the evaluation at {evaluation_uri} belongs to pipeline run {evaluation.pipeline_run_id!r}, not "
            f"to {pipeline_run_id!r}, which trained the policy: evaluate this policy with --pipeline-run-id "
            f"{pipeline_run_id} and pass that evaluation"
        )


def registration_run_id(policy_uri: str, evaluation_uri: str, pipeline_run_id: str | None) -> str:
    """The pipeline run a registration belongs to: the one the policy's lineage names, which a given
    `pipeline_run_id` and the evaluation's run must both be (`_check_same_run`).

    The register stage asks this before it opens its MLflow run or publishes anything, so a refused
    registration leaves no run nested under a pipeline run that never happened.
    """
    policy = read_model_lineage("policy", policy_uri)
    run_id = pipeline_run_id or str(policy["pipeline_run_id"])
    _check_same_run(policy, read_evaluation(evaluation_uri), run_id, policy_uri, evaluation_uri)
    return run_id


def folder_of(version: ModelVersion) -> str:
    """The folder a version's weights are in: its `model_folder` tag, or the `source` of a version
    registered before versions were logged models (then the source was the folder itself)."""
    return version.tags.get(FOLDER_TAG) or version.source


def _version_holding(client: MlflowClient, name: str, digest: str) -> ModelVersion | None:
    """The version of `name` that already holds these bytes, whoever registered it and from where.

    The digest covers the folder's `lineage.json` too, so equal digests also mean the same training run.
    """
    found = client.search_model_versions(
        f"name = {_literal(name)} and tags.{MODEL_SHA_TAG} = {_literal(digest)}"
    )
    return min(found, key=lambda version: int(version.version), default=None)


def _refuse_changed_artifact(
    client: MlflowClient, name: str, pipeline_run_id: str, source: str, digest: str
) -> None:
    """A version this pipeline run registered from `source` must still hash the same: a folder
    retrained in place would leave that version pointing at bytes its tags do not describe."""
    found = client.search_model_versions(
        f"name = {_literal(name)} and tags.{PIPELINE_RUN_TAG} = {_literal(pipeline_run_id)}"
    )
    for version in sorted(found, key=lambda version: int(version.version)):
        recorded = version.tags.get(MODEL_SHA_TAG)
        if folder_of(version) == source and recorded != digest:
            raise RegistryError(
                f"{name} version {version.version} was registered from {source} with sha256 {recorded}, but "
                f"the folder now has sha256 {digest}: the artifact changed after it was registered"
            )


def _ensure_registered_model(client: MlflowClient, name: str, role: Role) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if not _not_found(error):
            raise
        try:
            client.create_registered_model(name, description=f"Safe RLHF-V {role} model ({TRAINED_BY[role]})")
        except MlflowException as race:
            # Another registration created it in between: that is the state we wanted.
            if race.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def _check_run_exists(client: MlflowClient, run_id: str, role: Role, uri: str) -> None:
    """A version's run link must resolve in this store, or the UI would link to nothing."""
    try:
        client.get_run(run_id)
    except MlflowException as error:
        if not _not_found(error):
            raise
        raise RegistryError(
            f"the lineage of the {role} model at {uri} names MLflow run {run_id}, which "
            f"{client.tracking_uri} does not hold: register against the tracking store the pipeline logged to"
        ) from None


def version_links(refs: Mapping[str, ModelVersionRef]) -> str:
    """Markdown links to versions, which the MLflow UI renders in a description (tags stay plain text)."""
    return ", ".join(
        f"[{ref.name} v{ref.version}](#/models/{ref.name}/versions/{ref.version})" for ref in refs.values()
    )


def _card(
    client: MlflowClient,
    role: Role,
    lineage: Mapping[str, Any],
    source: str,
    digest: str,
    evaluation: Mapping[str, float],
) -> str:
    """The model card, from the lineage, the training run's settings and figures, and the evaluation."""
    run = client.get_run(lineage["mlflow_run_id"])
    return mlflow_models.model_card(
        role,
        lineage,
        digest,
        source,
        training_params=run.data.params,
        training_metrics=run.data.metrics,
        evaluation={key: evaluation[key] for key in HEADLINE_METRICS + JUDGE_METRICS if key in evaluation},
    )


def _register_one(
    client: MlflowClient,
    cfg: PipelineConfig,
    role: Role,
    uri: str,
    lineage: Mapping[str, Any],
    tags: dict[str, str],
    upstream: Mapping[str, ModelVersionRef],
    evaluation: Mapping[str, float],
) -> ModelVersionRef:
    """The version already holding these bytes, or a new one: one version per content, never two.

    A new version is a new logged model (MLmodel, signature, card; the weights referenced, see
    `mlflow_models`), so bytes already registered log nothing either.
    """
    name = getattr(cfg.registry, f"{role}_name")
    source = source_uri(uri)
    digest, pipeline_run_id = tags[MODEL_SHA_TAG], tags[PIPELINE_RUN_TAG]
    _refuse_changed_artifact(client, name, pipeline_run_id, source, digest)
    existing = _version_holding(client, name, digest)
    if existing is not None:
        registered_in = existing.tags.get(PIPELINE_RUN_TAG, "")
        model_id = (
            existing.source.removeprefix("models:/") if existing.source.startswith("models:/m-") else None
        )
        return ModelVersionRef(
            name, str(existing.version), folder_of(existing), False, digest, registered_in, model_id=model_id
        )
    _check_run_exists(client, lineage["mlflow_run_id"], role, uri)
    _ensure_registered_model(client, name, role)
    config = mlflow_models.model_config(cfg, role, source, digest)
    if "guard" in upstream:
        guard = upstream["guard"]
        config["guard"] = {"role": "guard", "folder": guard.source, "sha256": guard.model_sha256}
    logged = mlflow_models.log_registered_model(
        client,
        role,
        source_run_id=lineage["mlflow_run_id"],
        config=config,
        card=_card(client, role, lineage, source, digest, evaluation),
    )
    description = f"{role} model from {TRAINED_BY[role]} in pipeline run {lineage['pipeline_run_id']}"
    if upstream:
        description += f". Trained and evaluated with {version_links(upstream)}."
    version = client.create_model_version(
        name,
        source=f"models:/{logged.model_id}",
        run_id=lineage["mlflow_run_id"],
        tags=tags | {FOLDER_TAG: source},
        description=description,
        model_id=logged.model_id,
    )
    return ModelVersionRef(
        name, str(version.version), source, True, digest, pipeline_run_id, model_id=logged.model_id
    )


def _link_upstream_inputs(
    client: MlflowClient, policy_run_id: str, refs: Mapping[str, ModelVersionRef]
) -> None:
    """Show the reward and cost models as MLflow 3 model inputs of the PPO run that trained against
    them, so its page links them instead of naming digests. Only when this registration created the
    policy version: a retry or re-registration would add the same inputs again."""
    upstream = [refs[role].model_id for role in ("reward", "cost")]
    if refs["policy"].created and all(upstream):
        client.log_inputs(policy_run_id, models=[LoggedModelInput(str(model_id)) for model_id in upstream])


def _moves_alias(client: MlflowClient, policy: ModelVersionRef, pipeline_run_id: str, alias: str) -> bool:
    """Whether this registration points `alias` at the policy version.

    A new version always takes it. An existing one only when this same pipeline run registered it: a
    retry completes a registration that stopped before the alias moved, unless a later registration
    (a higher version) has taken the alias since. Bytes registered by another run move nothing.
    """
    if policy.created:
        return True
    if policy.registered_in != pipeline_run_id:
        return False
    held = client.get_registered_model(policy.name).aliases.get(alias)
    return held is None or int(held) <= int(policy.version)


def register_run_models(
    cfg: PipelineConfig,
    *,
    policy_uri: str,
    reward_uri: str,
    cost_uri: str,
    guard_uri: str,
    evaluation_uri: str,
    pipeline_run_id: str,
) -> dict[str, ModelVersionRef]:
    """Register the run's four models and point the `candidate` alias at the policy version.

    Everything is read and checked before anything is written: every lineage record, the
    evaluation's figures, that `pipeline_run_id` is the run that trained and evaluated the policy,
    the digests of all four folders, and that the reward and cost folders are the ones the policy
    was trained against.

    Keyed by content: a folder whose `model_sha256` a version of that model already carries gets
    that version back (from any source, any run), so the same bytes are never registered twice. A
    version this run registered from the same source must still match the folder's digest. This
    makes a KFP retry of a half-finished registration safe: the retry reuses what the first attempt
    created, fills in the rest and sets the alias the first attempt may not have reached; bytes
    another run registered move no alias (`_moves_alias`). Races remain on a cluster because MLflow
    has no conditional create: two registrations of the same bytes running at the same time (a
    retry started while a pod presumed dead still runs) can both miss the search and each create a
    version; and two pipeline runs finishing together both move `candidate`, the last one winning.
    """
    uris: dict[Role, str] = {"policy": policy_uri, "reward": reward_uri, "cost": cost_uri, "guard": guard_uri}
    lineages = {role: read_model_lineage(role, uri) for role, uri in uris.items()}
    evaluation = read_evaluation(evaluation_uri)
    _check_same_run(lineages["policy"], evaluation, pipeline_run_id, policy_uri, evaluation_uri)
    digests = {role: model_digest(uri) for role, uri in uris.items()}
    for role in ("reward", "cost"):
        _check_upstream(lineages["policy"], role, digests[role], uris[role])
    client, tracking_uri = client_for(cfg)
    # A local store resolves a version's `models:/<id>` source through the process-wide tracking
    # URI, so it must be this store's (the stages have set it already; a direct call may not).
    mlflow.set_tracking_uri(tracking_uri)
    refs: dict[str, ModelVersionRef] = {}
    with tracking.tracking_errors(tracking_uri):
        for role in ROLES:
            tags = _lineage_tags(lineages[role], pipeline_run_id, digests[role])
            upstream: dict[str, ModelVersionRef] = {}
            if role == "policy":
                upstream = {name: refs[name] for name in ("reward", "cost", "guard")}
                tags |= _policy_tags(upstream, evaluation, evaluation_uri)
            figures = evaluation.metrics if role == "policy" else {}
            refs[role] = _register_one(client, cfg, role, uris[role], lineages[role], tags, upstream, figures)
        _link_upstream_inputs(client, lineages["policy"]["mlflow_run_id"], refs)
        policy, alias = refs["policy"], cfg.registry.candidate_alias
        if _moves_alias(client, policy, pipeline_run_id, alias):
            client.set_registered_model_alias(policy.name, alias, policy.version)
            refs["policy"] = replace(policy, alias=alias)
    return refs


# ---------------------------------------------------------------------------------- promotion


def gate_limits(cfg: PipelineConfig) -> GateLimits:
    """The gate's limits; the cost budget defaults to the one PPO-Lagrangian trained against."""
    gate = cfg.promotion
    threshold = gate.cost_threshold
    if threshold is None:
        threshold = cfg.train_ppo_lag.lagrangian.threshold
    return GateLimits(threshold, gate.max_harmful_share, gate.min_reward_delta, gate.judge, gate.bound)


def _figure(tags: Mapping[str, str], key: str) -> float | None:
    """A figure from a version's tags; None when missing, unreadable or not finite."""
    try:
        value = float(tags[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _at_most(name: str, label: str, figure: float | None, limit: float, key: str) -> GateCheck:
    if figure is None:
        return GateCheck(name, None, limit, False, f"{label} unknown: the version has no {key} tag")
    passed = figure <= limit
    relation = "<=" if passed else ">"
    return GateCheck(name, figure, limit, passed, f"{label} {figure:.4g} {relation} limit {limit:.4g}")


def _reward_check(
    figures: Mapping[str, str], holder: ModelVersion | None, alias: str, min_delta: float
) -> GateCheck:
    """Mean reward not below the holder's minus `min_delta`; no holder passes, an unknown figure fails."""
    name = "reward_not_worse"
    reward = _figure(figures, REWARD_KEY)
    if holder is None:
        detail = f"no version holds {alias!r} yet"
        return GateCheck(name, reward, None, True, detail)
    held = _figure(holder.tags, REWARD_KEY)
    if reward is None or held is None:
        which = "the version" if reward is None else f"the holder (version {holder.version})"
        return GateCheck(name, reward, None, False, f"cannot compare: {which} has no {REWARD_KEY} tag")
    limit = held - min_delta
    passed = reward >= limit
    relation = ">=" if passed else "<"
    detail = (
        f"mean reward {reward:.4g} {relation} {limit:.4g} (version {holder.version} holds {alias!r} with "
        f"{held:.4g}, allowed drop {min_delta:.4g})"
    )
    ours, theirs = figures.get("reward_model_version"), holder.tags.get("reward_model_version")
    if ours != theirs:
        detail += f"; note: scored by different reward models ({ours} vs {theirs}), not on one scale"
    return GateCheck(name, reward, limit, passed, detail)


def _harmful_share_check(figures: Mapping[str, str], limits: GateLimits) -> GateCheck:
    """The harmful share by the most trusted judge the version carries, at its upper bound.

    The learned cost model is the model PPO optimised against, so its share is the last resort: a
    policy that games it would grade itself. The upper bound keeps a small evaluation from passing
    on a lucky draw (0 harmful answers out of 60 still bounds the share at 6%).
    """
    judges = HARM_JUDGES[-1:] if limits.judge == "cost_model" else HARM_JUDGES
    judge, key = next(((name, key) for name, key in judges if key in figures), judges[-1])
    tag = f"{key}_upper" if limits.bound == "upper" else key
    label = f"harmful share ({judge}{', upper bound' if limits.bound == 'upper' else ''})"
    check = _at_most("harmful_share", label, _figure(figures, tag), limits.max_harmful_share, tag)
    point = _figure(figures, key)
    if limits.bound == "upper" and point is not None:
        check = replace(check, detail=f"{check.detail} (point estimate {point:.4g})")
    return check


def _judges_agree_check(figures: Mapping[str, str]) -> GateCheck:
    """Refuse when a learned judge (cost model, guard) sees the policy's harm move the other way
    from the reference judge: then at least one of them is wrong, and a person has to look."""
    name = "judges_agree"
    if JUDGES_DISAGREE_KEY not in figures:
        return GateCheck(
            name, None, None, True, "no reference judge: the learned judges are not cross-checked"
        )
    disagree = _figure(figures, JUDGES_DISAGREE_KEY)
    if disagree is None:
        return GateCheck(name, None, 0.0, False, f"{JUDGES_DISAGREE_KEY} tag is unreadable")
    if disagree:
        detail = "a learned judge and the reference judge disagree on the direction of harm: see the report"
        return GateCheck(name, disagree, 0.0, False, detail)
    return GateCheck(name, disagree, 0.0, True, "every judge of harm agrees in direction")


def evaluate_gate(
    figures: Mapping[str, str], holder: ModelVersion | None, alias: str, limits: GateLimits
) -> list[GateCheck]:
    """Every check of the gate on a version's tags (a failing check does not stop the others)."""
    cost = _figure(figures, COST_KEY)
    return [
        _at_most("cost_budget", "evaluation J_C (mean cost)", cost, limits.cost_threshold, COST_KEY),
        _harmful_share_check(figures, limits),
        _judges_agree_check(figures),
        _reward_check(figures, holder, alias, limits.min_reward_delta),
    ]


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        raise RegistryError("cannot tell who is promoting (no login name): pass --user") from None


def _next_record(tags: Mapping[str, str]) -> int:
    numbers = [int(match.group(1)) for key in tags if (match := _RECORD_RE.match(key))]
    return max(numbers, default=0) + 1


def _order_check(tags: Mapping[str, str], before: str) -> GateCheck:
    """Whether the version reached `before` by a promotion that passed the gate unforced.

    A forced record does not count: its gate was overridden, so the version never showed it passes.
    """
    records = sorted({int(match.group(1)) for key in tags if (match := _RECORD_RE.match(key))})
    reached = [number for number in records if tags.get(f"promotion.{number}.alias") == before]
    passed = [number for number in reached if tags.get(f"promotion.{number}.forced") == "false"]
    name = f"passed_{before}"
    if passed:
        return GateCheck(name, None, None, True, f"passed {before!r} unforced (promotion record {passed[0]})")
    forced = f" (only forced, in promotion record {reached[0]})" if reached else ""
    return GateCheck(name, None, None, False, f"never passed a non-forced promotion to {before!r}{forced}")


def _number(value: float | None) -> str:
    return "unknown" if value is None else repr(value)


def _promotion_tags(result: PromotionResult) -> dict[str, str]:
    prefix = f"promotion.{result.record}."
    tags = {
        "alias": result.alias,
        "user": result.user,
        "time": result.time,
        "forced": str(result.forced).lower(),
        "replaced_version": result.previous_version or "none",
    }
    if result.reason:
        tags["reason"] = result.reason
    for check in result.checks:
        tags |= {
            f"gate.{check.name}.passed": str(check.passed).lower(),
            f"gate.{check.name}.figure": _number(check.figure),
            f"gate.{check.name}.limit": _number(check.limit),
        }
    return {prefix + key: value for key, value in tags.items()}


def promote(
    cfg: PipelineConfig,
    *,
    model: str,
    version: str,
    to: str,
    force: bool = False,
    reason: str | None = None,
    user: str | None = None,
) -> PromotionResult:
    """Move alias `to` (staging or production) to `model` version `version` if the gate passes.

    An alias that `promotion.requires_passed` puts after another (`production` after `staging`) takes
    only a version that passed the earlier one unforced; otherwise the promotion is refused before
    the gate runs, since promoting to the earlier alias is what runs the gate first. `force` skips
    the order as it skips the gate, and the record says so (`gate.passed_<alias>.passed: false`).

    The record is written before the alias moves: if the move then fails, the version shows an
    attempt that did not take effect, which is better than an alias moved with no record of why.
    Concurrent promotions of one version may pick the same record number (MLflow has no counter).
    """
    if to not in PROMOTION_TARGETS:
        raise RegistryError(f"cannot promote to {to!r}: choose one of {', '.join(PROMOTION_TARGETS)}")
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs a non-empty --reason: it is recorded on the version")
    who = user or _current_user()
    client, uri = client_for(cfg)
    with tracking.tracking_errors(uri):
        aliases = _registered_model_aliases(client, model, uri)
        target = _model_version(client, model, str(version))
        before = cfg.promotion.requires_passed.get(to)
        order = [_order_check(target.tags, before)] if before else []
        if not force and not all(check.passed for check in order):
            raise RegistryError(
                f"cannot promote {model} version {target.version} to {to!r}: it {order[0].detail}; "
                f"promote it to {before!r} first, or pass --force with --reason TEXT"
            )
        holder_version = aliases.get(to)
        holder = _model_version(client, model, holder_version) if holder_version else None
        checks = order + evaluate_gate(target.tags, holder, to, gate_limits(cfg))
        if not force and not all(check.passed for check in checks):
            raise PromotionRefused(model, str(target.version), to, checks)
        result = PromotionResult(
            model=model,
            version=str(target.version),
            alias=to,
            previous_version=holder_version,
            checks=checks,
            forced=force,
            reason=reason.strip() if reason else None,
            user=who,
            time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            record=_next_record(target.tags),
        )
        for key, value in _promotion_tags(result).items():
            client.set_model_version_tag(model, result.version, key, value)
        client.set_registered_model_alias(model, to, result.version)
    return result


def gate_table(checks: list[GateCheck]) -> str:
    """The gate as a fixed-width table for the terminal."""
    lines = [f"{'check':<18} {'figure':>10} {'limit':>10}  result  detail"]
    for check in checks:
        figure = "-" if check.figure is None else f"{check.figure:.4g}"
        limit = "-" if check.limit is None else f"{check.limit:.4g}"
        outcome = "pass" if check.passed else "FAIL"
        lines.append(f"{check.name:<18} {figure:>10} {limit:>10}  {outcome:<6}  {check.detail}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ listing


def _version_info(version: ModelVersion, aliases: Mapping[str, str]) -> VersionInfo:
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=timezone.utc)
    figures = {key: value for key in HEADLINE_METRICS if (value := _figure(version.tags, key)) is not None}
    held = tuple(sorted(alias for alias, holder in aliases.items() if holder == str(version.version)))
    recorded = {
        value for key, value in version.tags.items() if _RECORD_RE.match(key) and key.endswith(".alias")
    }
    return VersionInfo(
        name=version.name,
        version=str(version.version),
        aliases=held,
        source=folder_of(version),
        pipeline_run_id=version.tags.get(PIPELINE_RUN_TAG),
        created=created.isoformat(timespec="seconds"),
        figures=figures,
        ungated=tuple(alias for alias in held if alias in PROMOTION_TARGETS and alias not in recorded),
    )


def list_versions(cfg: PipelineConfig, name: str | None = None) -> list[VersionInfo]:
    """Versions and aliases of `name`, or of the config's four registered models that exist yet."""
    client, uri = client_for(cfg)
    names = [name] if name else [getattr(cfg.registry, f"{role}_name") for role in ROLES]
    rows: list[VersionInfo] = []
    with tracking.tracking_errors(uri):
        for model in names:
            try:
                aliases = _registered_model_aliases(client, model, uri)
            except RegistryError:
                if name:
                    raise
                continue
            rows += [_version_info(version, aliases) for version in _versions_of(client, model)]
    return rows


def versions_table(rows: list[VersionInfo]) -> str:
    """Versions as a fixed-width table: aliases, headline figures, pipeline run and source."""
    lines = [
        f"{'model':<24} {'ver':>4}  {'aliases':<20} {'reward':>8} {'cost':>8} {'harmful':>8}  "
        f"{'pipeline run':<24} source"
    ]
    for row in rows:
        figures = [row.figures.get(key) for key in (REWARD_KEY, COST_KEY, HARMFUL_SHARE_KEY)]
        cells = ["-" if value is None else f"{value:.3f}" for value in figures]
        aliases = ",".join(f"{alias}!" if alias in row.ungated else alias for alias in row.aliases) or "-"
        lines.append(
            f"{row.name:<24} {row.version:>4}  {aliases:<20} {cells[0]:>8} {cells[1]:>8} {cells[2]:>8}  "
            f"{row.pipeline_run_id or '-':<24} {row.source}"
        )
    if any(row.ungated for row in rows):
        lines.append(
            "! alias moved outside the promotion gate (no promotion record): re-run promote to gate it"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- resolving

_MODEL_URI_RE = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))")


def resolve_version(cfg: PipelineConfig, uri: str) -> ModelVersion:
    """The version a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI names, for loading it.

    What a person types to serve "whatever production is now"; `folder_of` the version is the folder
    (or `s3://` prefix) to load, and its tags name the upstream models it was evaluated with.
    """
    match = _MODEL_URI_RE.fullmatch(uri)
    if match is None:
        raise RegistryError(
            f"{uri!r} is not a model URI: expected models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    name, alias = match["name"], match["alias"]
    client, tracking_uri = client_for(cfg)
    with tracking.tracking_errors(tracking_uri):
        aliases = _registered_model_aliases(client, name, tracking_uri)
        version = match["version"] or aliases.get(alias)
        if version is None:
            raise RegistryError(
                f"registered model {name!r} has no alias {alias!r}; its aliases: "
                f"{', '.join(f'{a} -> {v}' for a, v in sorted(aliases.items())) or 'none'}"
            )
        return _model_version(client, name, version)


def upstream_version_uri(version: ModelVersion, role: Role) -> str | None:
    """The `models:/` URI of the `role` model a policy version was registered with (None if untagged)."""
    return version.tags.get(UPSTREAM_TAG.format(role=role))
