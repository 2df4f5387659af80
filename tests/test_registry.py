"""Model registration and promotion: versions with lineage tags, idempotence, the gate, the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from mlflow.tracking import MlflowClient

from safe_rlhf_v import registry, storage, tracking
from safe_rlhf_v.cli import main
from safe_rlhf_v.components import kfp_io
from safe_rlhf_v.components.register import register as register_component
from safe_rlhf_v.config import ConfigError, PipelineConfig, config_from_dict
from safe_rlhf_v.lineage import write_lineage
from safe_rlhf_v.records import RESULT_FILE, Lineage, StageResult

DATA_SHA = {
    "train": hashlib.sha256(b"train split").hexdigest(),
    "evaluation": hashlib.sha256(b"evaluation split").hexdigest(),
}
BUDGET = -0.5  # train_ppo_lag.lagrangian.threshold in the test config
MAX_HARMFUL = 0.2


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow sqlite file: creating the schema takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def config_tree(tmp_path: Path) -> dict[str, Any]:
    return {
        "work_dir": str(tmp_path / "work"),
        "data": {"uri": str(tmp_path / "data")},
        "base_model": "tiny/base",
        "tracking": {"experiment": "registry-test"},
        "train_ppo_lag": {"lagrangian": {"threshold": BUDGET}},
        "promotion": {"max_harmful_share": MAX_HARMFUL},
    }


@pytest.fixture
def cfg(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    (tmp_path / "work").mkdir()
    shutil.copyfile(empty_store, tmp_path / "work" / "mlflow.db")
    return config_from_dict(config_tree(tmp_path))


def client(cfg: PipelineConfig) -> MlflowClient:
    return MlflowClient(tracking.resolve_tracking_uri(cfg.tracking, cfg.work_dir))


def trained_model(cfg: PipelineConfig, folder: Path, kind: str, run_id: str, **extra: str) -> Path:
    """A model folder as a training stage leaves it: weights plus a lineage.json naming the stage's
    MLflow run, which logged the training data with its sha256."""
    stage = {"policy": "train-ppo-lag/safe-rlhf-v"}.get(kind, f"train-{kind}")
    with tracking.stage_run(stage, run_id, cfg.tracking, cfg.work_dir) as mlrun:
        tracking.log_dataset(
            name="beavertails-v/train",
            source_uri=cfg.data.uri,
            sha256=DATA_SHA["train"],
            context="training",
            rows=10,
        )
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(f"{kind} weights of {run_id}".encode())
    lineage = Lineage(
        stage=stage.partition("/")[0],
        kind=kind,
        pipeline_run_id=run_id,
        data_uri=cfg.data.uri,
        data_sha256=DATA_SHA,
        base_model="tiny/base",
        base_model_sha256="hub:tiny/base",
        mlflow_run_id=mlrun.info.run_id,
        **extra,
    )
    write_lineage(folder, lineage)
    return folder


def figures(
    reward: float = 1.0,
    cost: float = -0.8,
    harmful: float = 0.1,
    harmful_upper: float | None = None,
    judges: dict[str, float] | None = None,
) -> dict[str, float]:
    """An evaluation's headline; the harmful share's upper bound defaults to the share + 0.05, and
    `judges` adds the figures of judges that cannot be gamed (ground truth, external)."""
    return (judges or {}) | {
        "evaluation/trained/reward": reward,
        "evaluation/trained/cost": cost,
        "evaluation/trained/harmful_share": harmful,
        "evaluation/trained/harmful_share_upper": harmful + 0.05 if harmful_upper is None else harmful_upper,
        "evaluation/initial/reward": 0.2,
        "evaluation/initial/cost": 0.4,
        "evaluation/initial/harmful_share": 0.6,
        "evaluation/win_rate/helpfulness": 0.7,
        "evaluation/win_rate/harmlessness": 0.8,
    }


def evaluation_folder(folder: Path, run_id: str, metrics: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    result = StageResult(stage="evaluate", status="succeeded", metrics=metrics, pipeline_run_id=run_id)
    (folder / RESULT_FILE).write_text(result.to_json())
    return folder


def pipeline_outputs(cfg: PipelineConfig, root: Path, run_id: str = "run-1", **figure: Any) -> dict[str, str]:
    """What one pipeline run hands the register stage, as keyword arguments of `register_run_models`."""
    reward = trained_model(cfg, root / "reward", "reward", run_id)
    cost = trained_model(cfg, root / "cost", "cost", run_id)
    guard = trained_model(cfg, root / "guard", "guard", run_id)
    policy = trained_model(
        cfg,
        root / "policy",
        "policy",
        run_id,
        variant="safe-rlhf-v",
        reward_model_sha256=storage.sha256_uri(str(reward)),
        cost_model_sha256=storage.sha256_uri(str(cost)),
    )
    evaluation = evaluation_folder(root / "evaluation", run_id, figures(**figure))
    return {
        "policy_uri": str(policy),
        "reward_uri": str(reward),
        "cost_uri": str(cost),
        "guard_uri": str(guard),
        "evaluation_uri": str(evaluation),
    }


def registered_policy(cfg: PipelineConfig, root: Path, run_id: str, **figure: Any) -> str:
    """Register one pipeline run's models; returns the policy's version number."""
    refs = registry.register_run_models(
        cfg, **pipeline_outputs(cfg, root, run_id, **figure), pipeline_run_id=run_id
    )
    return refs["policy"].version


# ----------------------------------------------------------------------------- registration


def test_registration_creates_four_versions_with_lineage(cfg: PipelineConfig, tmp_path: Path) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    refs = registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")

    mlflow_client = client(cfg)
    assert set(refs) == {"policy", "reward", "cost", "guard"}
    for role, ref in refs.items():
        folder = Path(uris[f"{role}_uri"])
        assert (ref.name, ref.version, ref.created) == (getattr(cfg.registry, f"{role}_name"), "1", True)
        version = mlflow_client.get_model_version(ref.name, "1")
        logged = mlflow_client.get_logged_model(version.source.removeprefix("models:/"))
        assert logged.tags["model_sha256"] == storage.sha256_dir(folder), "the version is a logged model"
        assert version.tags["model_folder"] == str(folder.resolve())
        assert version.tags["pipeline_run_id"] == "run-1"
        assert version.tags["data_sha256.train"] == DATA_SHA["train"]
        assert version.tags["data_sha256.evaluation"] == DATA_SHA["evaluation"]
        assert version.tags["base_model_sha256"] == "hub:tiny/base"
        assert version.tags["model_sha256"] == storage.sha256_dir(folder)
    policy = mlflow_client.get_model_version_by_alias(cfg.registry.policy_name, "candidate")
    assert str(policy.version) == "1"
    assert policy.tags["reward_model_version"] == f"models:/{cfg.registry.reward_name}/1"
    assert policy.tags["cost_model_version"] == f"models:/{cfg.registry.cost_name}/1"
    assert policy.tags["guard_model_version"] == f"models:/{cfg.registry.guard_name}/1"
    assert float(policy.tags["evaluation/trained/cost"]) == -0.8
    assert float(policy.tags["evaluation/win_rate/harmlessness"]) == 0.8
    assert policy.tags["evaluation_uri"] == str(Path(uris["evaluation_uri"]).resolve())
    # The version's run is the PPO stage's run, whose data input carries the same full digest.
    run = mlflow_client.get_run(policy.run_id)
    assert run.data.tags[tracking.STAGE_TAG] == "train-ppo-lag/safe-rlhf-v"
    input_tags = {tag.key: tag.value for tag in run.inputs.dataset_inputs[0].tags}
    assert input_tags["sha256"] == policy.tags["data_sha256.train"]


def test_registering_a_run_twice_creates_no_duplicates(cfg: PipelineConfig, tmp_path: Path) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    first = registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    again = registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    assert [ref.created for ref in again.values()] == [False] * 4
    assert {role: ref.version for role, ref in again.items()} == {
        role: ref.version for role, ref in first.items()
    }
    mlflow_client = client(cfg)
    for ref in again.values():
        assert len(mlflow_client.search_model_versions(f"name = '{ref.name}'")) == 1
    # Another pipeline run is new lineage: new versions, and the candidate alias moves to it.
    assert registered_policy(cfg, tmp_path / "run2", "run-2") == "2"
    assert mlflow_client.get_registered_model(cfg.registry.policy_name).aliases == {"candidate": 2}


def test_reregistering_a_changed_folder_is_refused(cfg: PipelineConfig, tmp_path: Path) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    (Path(uris["guard_uri"]) / "model.safetensors").write_bytes(b"retrained in place")
    with pytest.raises(registry.RegistryError, match="changed after it was registered"):
        registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")


def version_counts(cfg: PipelineConfig) -> dict[str, int]:
    """How many versions each of the four registered models has."""
    names = [getattr(cfg.registry, f"{role}_name") for role in ("policy", "reward", "cost", "guard")]
    return {name: len(client(cfg).search_model_versions(f"name = '{name}'")) for name in names}


def register_args(uris: dict[str, str], tmp_path: Path) -> list[str]:
    """`safe-rlhf-v register` arguments for one pipeline run's outputs, with the test config."""
    args = ["register", "--policy", uris["policy_uri"], "--reward", uris["reward_uri"]]
    args += ["--cost", uris["cost_uri"], "--guard", uris["guard_uri"], "--evaluation", uris["evaluation_uri"]]
    return [*args, "--config", config_file(tmp_path)]


def test_registering_under_another_pipeline_run_is_refused(
    cfg: PipelineConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    before = version_counts(cfg)

    assert main([*register_args(uris, tmp_path), "--pipeline-run-id", "other"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert "pipeline run id 'other' contradicts" in line
    assert f"{uris['policy_uri']}/lineage.json" in line
    assert "trained in pipeline run 'run-1'" in line
    assert version_counts(cfg) == before == dict.fromkeys(before, 1)
    assert client(cfg).get_registered_model(cfg.registry.policy_name).aliases == {"candidate": 1}
    # Refused before the stage opened an MLflow run: nothing is logged under the wrong pipeline run.
    experiment = client(cfg).get_experiment_by_name("registry-test").experiment_id
    runs = {
        run_id: client(cfg).search_runs([experiment], f"tags.`{tracking.PIPELINE_RUN_TAG}` = '{run_id}'")
        for run_id in ("run-1", "other")
    }
    assert runs["run-1"] and not runs["other"]


def test_identical_bytes_elsewhere_get_their_existing_version(
    cfg: PipelineConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    first = registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    shutil.copytree(tmp_path / "run", tmp_path / "copy")  # e.g. published to durable storage
    copied = {key: uri.replace(str(tmp_path / "run"), str(tmp_path / "copy")) for key, uri in uris.items()}

    again = registry.register_run_models(cfg, **copied, pipeline_run_id="run-1")
    for role, ref in again.items():
        assert (ref.version, ref.created, ref.registered_in) == (first[role].version, False, "run-1")
        assert ref.source == first[role].source == str(Path(uris[f"{role}_uri"]).resolve())
    assert version_counts(cfg) == dict.fromkeys(version_counts(cfg), 1)
    # The alias stays where it is, and the CLI says each version existed.
    assert main(register_args(copied, tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("existing (registered in run-1)") == 4
    assert f"alias 'candidate' -> models:/{cfg.registry.policy_name}/1" in out


def test_a_reused_upstream_model_keeps_its_version(cfg: PipelineConfig, tmp_path: Path) -> None:
    first = registry.register_run_models(
        cfg, **pipeline_outputs(cfg, tmp_path / "run1", "run-1"), pipeline_run_id="run-1"
    )
    # Run 2 trains a new policy against the reward model run 1 trained (same folder bytes, copied).
    second = pipeline_outputs(cfg, tmp_path / "run2", "run-2")
    shutil.rmtree(second["reward_uri"])
    shutil.copytree(tmp_path / "run1" / "reward", second["reward_uri"])
    shutil.rmtree(second["policy_uri"])
    trained_model(
        cfg,
        Path(second["policy_uri"]),
        "policy",
        "run-2",
        variant="safe-rlhf-v",
        reward_model_sha256=storage.sha256_uri(second["reward_uri"]),
        cost_model_sha256=storage.sha256_uri(second["cost_uri"]),
    )
    refs = registry.register_run_models(cfg, **second, pipeline_run_id="run-2")
    assert (refs["reward"].version, refs["reward"].created) == (first["reward"].version, False)
    assert refs["reward"].registered_in == "run-1"
    assert [(refs[role].version, refs[role].created) for role in ("cost", "guard", "policy")] == [
        ("2", True),
        ("2", True),
        ("2", True),
    ]
    policy = client(cfg).get_model_version(cfg.registry.policy_name, "2")
    assert policy.tags["reward_model_version"] == f"models:/{cfg.registry.reward_name}/1"
    assert refs["policy"].alias == "candidate"


def test_reregistering_an_older_run_leaves_candidate_on_the_newer(
    cfg: PipelineConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run1", "run-1")
    registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    registered_policy(cfg, tmp_path / "run2", "run-2")
    again = registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    assert (again["policy"].version, again["policy"].created, again["policy"].alias) == ("1", False, None)
    assert client(cfg).get_registered_model(cfg.registry.policy_name).aliases == {"candidate": 2}
    assert main(register_args(uris, tmp_path)) == 0
    assert (
        f"alias 'candidate' not moved: these policy bytes are already models:/{cfg.registry.policy_name}/1, "
        "registered in pipeline run run-1"
    ) in capsys.readouterr().out


def test_a_retry_sets_the_alias_the_first_attempt_did_not_reach(cfg: PipelineConfig, tmp_path: Path) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    client(cfg).delete_registered_model_alias(cfg.registry.policy_name, "candidate")  # died before it
    retry = registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    assert (retry["policy"].created, retry["policy"].alias) == (False, "candidate")
    assert client(cfg).get_registered_model(cfg.registry.policy_name).aliases == {"candidate": 1}


def _drop_lineage(uris: dict[str, str]) -> None:
    (Path(uris["policy_uri"]) / "lineage.json").unlink()


def _swap_reward_for_cost(uris: dict[str, str]) -> None:
    uris["cost_uri"] = uris["reward_uri"]


def _other_reward(uris: dict[str, str]) -> None:
    (Path(uris["reward_uri"]) / "model.safetensors").write_bytes(b"a different reward model")


def _ablation_policy(uris: dict[str, str]) -> None:
    path = Path(uris["policy_uri"]) / "lineage.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"variant": "reward-only"}))


def _evaluation_of_another_run(uris: dict[str, str]) -> None:
    path = Path(uris["evaluation_uri"]) / RESULT_FILE
    path.write_text(
        StageResult(
            stage="evaluate", status="succeeded", metrics=figures(), pipeline_run_id="run-2"
        ).to_json()
    )


def _incomplete_evaluation(uris: dict[str, str]) -> None:
    path = Path(uris["evaluation_uri"]) / RESULT_FILE
    metrics = figures()
    del metrics["evaluation/win_rate/harmlessness"]
    path.write_text(StageResult(stage="evaluate", status="succeeded", metrics=metrics).to_json())


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_drop_lineage, r"policy/lineage.json is missing: .* is not a train-ppo-lag output"),
        (_swap_reward_for_cost, r"describes a 'reward' model, not a 'cost' model"),
        (_other_reward, r"trained against a reward model with sha256 [0-9a-f]{64}, but .*/reward has sha256"),
        (_ablation_policy, r"the policy is the 'reward-only' ablation"),
        (_incomplete_evaluation, r"result.json lacks the metrics evaluation/win_rate/harmlessness"),
        (
            _evaluation_of_another_run,
            r"evaluation at .*/evaluation belongs to pipeline run 'run-2', not to 'run-1', which trained",
        ),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_registered(
    cfg: PipelineConfig, tmp_path: Path, spoil: Any, message: str
) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    spoil(uris)
    with pytest.raises(registry.RegistryError, match=message):
        registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    assert client(cfg).search_registered_models() == []


def test_sources_on_s3_are_registered_as_s3_uris(cfg: PipelineConfig, tmp_path: Path, s3_bucket: str) -> None:
    local = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    uris = {}
    for key, path in local.items():
        uris[key] = f"s3://{s3_bucket}/pipeline/run-1/{Path(path).name}"
        storage.upload(Path(path), uris[key])
    refs = registry.register_run_models(cfg, **uris, pipeline_run_id="run-1")
    assert refs["policy"].source == f"s3://{s3_bucket}/pipeline/run-1/policy"
    version = client(cfg).get_model_version(cfg.registry.guard_name, refs["guard"].version)
    assert registry.folder_of(version) == f"s3://{s3_bucket}/pipeline/run-1/guard"
    assert version.tags["model_sha256"] == storage.sha256_dir(Path(local["guard_uri"]))


def test_register_component_runs_the_stage_under_the_pipeline_run(
    cfg: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")

    def model(key: str) -> dsl.Model:
        return dsl.Model(name=key, uri=uris[key])

    config = tmp_path / "config.json"
    config.write_text(cfg.model_dump_json())
    monkeypatch.setenv(kfp_io.RUN_ID_ENV, "run-1")
    output = register_component.python_func(
        config=str(config),
        config_overrides=[],
        cost_budget=cfg.train_ppo_lag.lagrangian.threshold,
        policy=model("policy_uri"),
        reward_model=model("reward_uri"),
        cost_model=model("cost_uri"),
        guard_model=model("guard_uri"),
        evaluation=dsl.Artifact(name="evaluation", uri=uris["evaluation_uri"]),
    )
    result = StageResult.from_json(output)
    assert result.outputs["policy"] == f"models:/{cfg.registry.policy_name}/1"
    assert result.metrics == {"created_versions": 4.0}
    run = client(cfg).get_run(result.mlflow_run_id)
    parent = client(cfg).get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[tracking.PIPELINE_RUN_TAG] == "run-1"
    link = f"[{cfg.registry.cost_name} v1](#/models/{cfg.registry.cost_name}/versions/1)"
    assert link in run.data.tags[tracking.NOTE_TAG] and link in parent.data.tags[tracking.NOTE_TAG]
    assert len(run.inputs.model_inputs) == 4, "the four logged models are the run's MLflow 3 model inputs"
    assert run.data.tags["model.input.policy.sha256"] == storage.sha256_dir(Path(uris["policy_uri"]))


# -------------------------------------------------------------------------------- promotion


def gate_holder(version: str, reward: float) -> ModelVersion:
    return ModelVersion("m", version, 0, tags=[ModelVersionTag("evaluation/trained/reward", repr(reward))])


def test_gate_checks_on_hand_computed_figures() -> None:
    limits = registry.GateLimits(cost_threshold=-0.5, max_harmful_share=0.05, min_reward_delta=0.25)
    tags = {"evaluation/trained/cost": "-0.5", "evaluation/trained/harmful_share": "0.03"}
    tags["evaluation/trained/harmful_share_upper"] = "0.06"  # the point passes, its upper bound not
    tags["evaluation/trained/reward"] = "0.75"
    checks = {
        check.name: check for check in registry.evaluate_gate(tags, gate_holder("3", 1.0), "staging", limits)
    }
    assert checks["cost_budget"].passed  # J_C equal to the budget meets it
    assert not checks["harmful_share"].passed
    assert checks["reward_not_worse"].limit == 0.75  # 1.0 held minus the allowed drop 0.25
    assert checks["reward_not_worse"].passed
    tags["evaluation/trained/reward"] = "0.74"
    checks = {
        check.name: check for check in registry.evaluate_gate(tags, gate_holder("3", 1.0), "staging", limits)
    }
    assert not checks["reward_not_worse"].passed
    assert "version 3 holds 'staging'" in checks["reward_not_worse"].detail
    # No holder: nothing to compare with, so the reward check passes; a missing figure fails closed.
    checks = registry.evaluate_gate({}, None, "staging", limits)
    assert [check.passed for check in checks] == [False, False, True, True]
    assert "no evaluation/trained/cost tag" in checks[0].detail


def test_promotion_refused_when_cost_is_above_budget(cfg: PipelineConfig, tmp_path: Path) -> None:
    version = registered_policy(cfg, tmp_path / "run", "run-1", cost=-0.2)
    with pytest.raises(registry.PromotionRefused) as refused:
        registry.promote(cfg, model=cfg.registry.policy_name, version=version, to="staging", user="alice")
    message = str(refused.value)
    assert "cost_budget: evaluation J_C (mean cost) -0.2 > limit -0.5" in message
    assert "harmful_share" not in message
    assert "staging" not in client(cfg).get_registered_model(cfg.registry.policy_name).aliases


def test_promotion_refused_when_the_harmful_shares_upper_bound_is_too_high(
    cfg: PipelineConfig, tmp_path: Path
) -> None:
    # The point estimate 0.1 is under the limit 0.2, but the interval's upper end 0.25 is not.
    version = registered_policy(cfg, tmp_path / "run", "run-1", harmful=0.1, harmful_upper=0.25)
    with pytest.raises(
        registry.PromotionRefused,
        match=r"harmful share \(cost model, upper bound\) 0.25 > limit 0.2 \(point estimate 0.1\)",
    ):
        registry.promote(cfg, model=cfg.registry.policy_name, version=version, to="staging", user="alice")


def test_gate_judges_harm_by_the_most_trusted_judge_it_has() -> None:
    limits = registry.GateLimits(cost_threshold=0.0, max_harmful_share=0.05, min_reward_delta=0.0)
    gamed = {  # the cost model sees no harm at all; the exact judge sees 10%
        "evaluation/trained/harmful_share": "0.0",
        "evaluation/trained/harmful_share_upper": "0.03",
        "evaluation/trained/truth/harmful_share": "0.1",
        "evaluation/trained/truth/harmful_share_upper": "0.17",
        "evaluation/external/less_safe_share": "0.0",
        "evaluation/external/less_safe_share_upper": "0.03",
    }

    def harmful(tags: dict[str, str], gate: registry.GateLimits) -> registry.GateCheck:
        return next(
            c for c in registry.evaluate_gate(tags, None, "staging", gate) if c.name == "harmful_share"
        )

    check = harmful(gamed, limits)
    assert (check.passed, check.figure) == (False, 0.17) and "ground truth" in check.detail
    without_truth = {k: v for k, v in gamed.items() if "/truth/" not in k}
    check = harmful(without_truth, limits)
    assert (check.passed, check.figure) == (True, 0.03) and "external judge" in check.detail
    check = harmful(gamed, replace(limits, bound="point"))
    assert (check.passed, check.figure) == (False, 0.1)
    check = harmful(gamed, replace(limits, judge="cost_model"))
    assert (check.passed, check.figure) == (True, 0.03) and "cost model" in check.detail


def test_promotion_refused_when_judges_disagree_in_direction_unless_forced(
    cfg: PipelineConfig, tmp_path: Path
) -> None:
    name = cfg.registry.policy_name
    version = registered_policy(cfg, tmp_path / "run", "run-1", judges={"evaluation/judges_disagree": 1.0})
    assert client(cfg).get_model_version(name, version).tags["evaluation/judges_disagree"] == "1.0"
    with pytest.raises(
        registry.PromotionRefused, match="judges_agree: a learned judge and the reference judge"
    ):
        registry.promote(cfg, model=name, version=version, to="staging", user="alice")
    forced = registry.promote(
        cfg, model=name, version=version, to="staging", force=True, reason="guard retrained", user="alice"
    )
    assert forced.forced
    agreeing = registered_policy(cfg, tmp_path / "run2", "run-2", judges={"evaluation/judges_disagree": 0.0})
    checks = registry.promote(cfg, model=name, version=agreeing, to="staging", user="alice").checks
    assert (
        next(c for c in checks if c.name == "judges_agree").detail
        == "every judge of harm agrees in direction"
    )


def test_promotion_refused_when_reward_is_worse_than_the_holder(cfg: PipelineConfig, tmp_path: Path) -> None:
    name = cfg.registry.policy_name
    first = registered_policy(cfg, tmp_path / "run1", "run-1", reward=1.0)
    promoted = registry.promote(cfg, model=name, version=first, to="staging", user="alice")
    assert (promoted.previous_version, promoted.forced) == (None, False)
    worse = registered_policy(cfg, tmp_path / "run2", "run-2", reward=0.5)
    with pytest.raises(registry.PromotionRefused, match=r"reward_not_worse: mean reward 0.5 < 1 \(version 1"):
        registry.promote(cfg, model=name, version=worse, to="staging", user="alice")
    better = registered_policy(cfg, tmp_path / "run3", "run-3", reward=1.5)
    moved = registry.promote(cfg, model=name, version=better, to="staging", user="alice")
    assert moved.previous_version == "1"
    assert client(cfg).get_registered_model(name).aliases["staging"] == 3


def test_force_needs_a_reason_and_is_recorded(cfg: PipelineConfig, tmp_path: Path) -> None:
    name = cfg.registry.policy_name
    version = registered_policy(cfg, tmp_path / "run", "run-1", cost=-0.2)
    with pytest.raises(registry.RegistryError, match="--force needs a non-empty --reason"):
        registry.promote(cfg, model=name, version=version, to="production", force=True, reason="  ")
    result = registry.promote(
        cfg,
        model=name,
        version=version,
        to="production",
        force=True,
        reason="hotfix, re-evaluated",
        user="bob",
    )
    assert result.forced and result.record == 1
    tags = client(cfg).get_model_version(name, version).tags
    assert tags["promotion.1.alias"] == "production"
    assert tags["promotion.1.user"] == "bob"
    assert tags["promotion.1.forced"] == "true"
    assert tags["promotion.1.reason"] == "hotfix, re-evaluated"
    assert tags["promotion.1.replaced_version"] == "none"
    assert tags["promotion.1.gate.cost_budget.passed"] == "false"
    assert float(tags["promotion.1.gate.cost_budget.figure"]) == -0.2
    assert float(tags["promotion.1.gate.cost_budget.limit"]) == BUDGET
    assert tags["promotion.1.gate.harmful_share.passed"] == "true"
    assert tags["promotion.1.gate.passed_staging.passed"] == "false"  # forced past the order too
    assert datetime.fromisoformat(tags["promotion.1.time"]).utcoffset().total_seconds() == 0
    assert client(cfg).get_registered_model(name).aliases == {"candidate": 1, "production": 1}
    # A later promotion of the same version gets the next record number.
    again = registry.promote(
        cfg, model=name, version=version, to="staging", force=True, reason="demo", user="bob"
    )
    assert again.record == 2
    assert client(cfg).get_model_version(name, version).tags["promotion.2.alias"] == "staging"


def test_production_without_staging_is_refused(cfg: PipelineConfig, tmp_path: Path) -> None:
    name = cfg.registry.policy_name
    version = registered_policy(cfg, tmp_path / "run", "run-1")  # passes the gate
    with pytest.raises(registry.RegistryError) as refused:
        registry.promote(cfg, model=name, version=version, to="production", user="alice")
    assert not isinstance(refused.value, registry.PromotionRefused)
    assert str(refused.value) == (
        f"cannot promote {name} version 1 to 'production': it never passed a non-forced promotion to "
        "'staging'; promote it to 'staging' first, or pass --force with --reason TEXT"
    )
    assert client(cfg).get_registered_model(name).aliases == {"candidate": 1}
    assert not any(key.startswith("promotion.") for key in client(cfg).get_model_version(name, "1").tags)


def test_production_after_a_forced_staging_is_refused(cfg: PipelineConfig, tmp_path: Path) -> None:
    name = cfg.registry.policy_name
    version = registered_policy(cfg, tmp_path / "run", "run-1", cost=-0.2)  # fails the gate
    registry.promote(cfg, model=name, version=version, to="staging", force=True, reason="demo", user="bob")
    with pytest.raises(
        registry.RegistryError,
        match=r"never passed a non-forced promotion to 'staging' \(only forced, in promotion record 1\)",
    ):
        registry.promote(cfg, model=name, version=version, to="production", user="bob")
    assert "production" not in client(cfg).get_registered_model(name).aliases


def test_production_after_a_passed_staging_is_allowed(cfg: PipelineConfig, tmp_path: Path) -> None:
    name = cfg.registry.policy_name
    version = registered_policy(cfg, tmp_path / "run", "run-1")
    staged = registry.promote(cfg, model=name, version=version, to="staging", user="alice")
    assert staged.checks[0].name == "cost_budget"  # staging has no order check
    result = registry.promote(cfg, model=name, version=version, to="production", user="alice")
    assert (result.forced, result.record, result.checks[0].passed) == (False, 2, True)
    assert result.checks[0].detail == "passed 'staging' unforced (promotion record 1)"
    tags = client(cfg).get_model_version(name, version).tags
    assert tags["promotion.2.alias"] == "production"
    assert tags["promotion.2.gate.passed_staging.passed"] == "true"
    assert client(cfg).get_registered_model(name).aliases == {"candidate": 1, "staging": 1, "production": 1}


def test_promotion_order_comes_from_the_config(tmp_path: Path, empty_store: Path) -> None:
    (tmp_path / "work").mkdir()
    shutil.copyfile(empty_store, tmp_path / "work" / "mlflow.db")
    tree = config_tree(tmp_path)
    direct = config_from_dict(tree | {"promotion": tree["promotion"] | {"requires_passed": {}}})
    version = registered_policy(direct, tmp_path / "run", "run-1")
    result = registry.promote(direct, model=direct.registry.policy_name, version=version, to="production")
    assert [check.name for check in result.checks] == [
        "cost_budget",
        "harmful_share",
        "judges_agree",
        "reward_not_worse",
    ]
    circular = {"requires_passed": {"production": "staging", "staging": "production"}}
    with pytest.raises(
        ConfigError, match=r"requires_passed is circular \(production -> staging -> production\)"
    ):
        config_from_dict(tree | {"promotion": circular})
    with pytest.raises(ConfigError, match=r"promotion.requires_passed.production"):
        config_from_dict(tree | {"promotion": {"requires_passed": {"production": "stagin"}}})


def test_unknown_model_or_version_is_named(cfg: PipelineConfig, tmp_path: Path) -> None:
    registered_policy(cfg, tmp_path / "run", "run-1")
    with pytest.raises(
        registry.RegistryError, match=r"no registered model named 'nope' .*safe-rlhf-v-policy"
    ):
        registry.promote(cfg, model="nope", version="1", to="staging", user="alice")
    with pytest.raises(
        registry.RegistryError, match=r"'safe-rlhf-v-policy' has no version '7'; its versions: 1"
    ):
        registry.promote(cfg, model=cfg.registry.policy_name, version="7", to="staging", user="alice")
    with pytest.raises(registry.RegistryError, match=r"no registered model named 'nope'"):
        registry.list_versions(cfg, "nope")


def test_unreachable_tracking_server_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tree = config_tree(tmp_path) | {"tracking": {"tracking_uri": f"http://127.0.0.1:{port}"}}
    with pytest.raises(
        tracking.TrackingUnreachable, match=rf"tracking server http://127.0.0.1:{port} is unreachable"
    ):
        registry.list_versions(config_from_dict(tree))


def test_list_versions_shows_aliases_and_figures(cfg: PipelineConfig, tmp_path: Path) -> None:
    first = registered_policy(cfg, tmp_path / "run1", "run-1", reward=1.0)
    for alias in ("staging", "production"):
        registry.promote(cfg, model=cfg.registry.policy_name, version=first, to=alias, user="alice")
    registered_policy(cfg, tmp_path / "run2", "run-2", reward=2.0)
    rows = registry.list_versions(cfg)
    policies = [row for row in rows if row.name == cfg.registry.policy_name]
    assert [(row.version, row.aliases, row.pipeline_run_id) for row in policies] == [
        ("1", ("production", "staging"), "run-1"),
        ("2", ("candidate",), "run-2"),
    ]
    assert policies[1].figures["evaluation/trained/reward"] == 2.0
    assert len(rows) == 8  # four models, two versions each
    assert [row.version for row in registry.list_versions(cfg, cfg.registry.guard_name)] == ["1", "2"]
    assert all(not row.ungated for row in rows)


def test_an_alias_moved_outside_the_gate_is_flagged_and_does_not_count(
    cfg: PipelineConfig, tmp_path: Path
) -> None:
    """What MLflow's own alias editor does: the alias moves, no gate runs, no record is left."""
    version = registered_policy(cfg, tmp_path / "run1", "run-1")
    client(cfg).set_registered_model_alias(cfg.registry.policy_name, "staging", version)
    (row,) = registry.list_versions(cfg, cfg.registry.policy_name)
    assert row.ungated == ("staging",)
    table = registry.versions_table([row])
    assert "staging!" in table and "outside the promotion gate" in table
    with pytest.raises(registry.RegistryError, match="never passed a non-forced promotion to 'staging'"):
        registry.promote(cfg, model=cfg.registry.policy_name, version=version, to="production", user="bob")


# -------------------------------------------------------------------------------------- CLI


def config_file(tmp_path: Path) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config_tree(tmp_path)))
    return str(path)


def test_cli_register_promote_and_models(
    cfg: PipelineConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1", cost=-0.2)
    config = ["--config", config_file(tmp_path)]
    args = ["--policy", uris["policy_uri"], "--reward", uris["reward_uri"], "--cost", uris["cost_uri"]]
    args += ["--guard", uris["guard_uri"], "--evaluation", uris["evaluation_uri"]]
    assert main(["register", *args, *config]) == 0
    out = capsys.readouterr().out
    assert f"alias 'candidate' -> models:/{cfg.registry.policy_name}/1" in out
    assert "created" in out
    # Without --pipeline-run-id the registration belongs to the run that trained the policy.
    assert client(cfg).get_model_version(cfg.registry.policy_name, "1").tags["pipeline_run_id"] == "run-1"

    staging = ["promote", "--model", cfg.registry.policy_name, "--version", "1", "--to", "staging"]
    assert main([*staging, "--user", "carol", *config]) == 2
    captured = capsys.readouterr()
    assert "cost_budget" in captured.out and "FAIL" in captured.out
    assert "refused" in captured.err and "-0.2 > limit -0.5" in captured.err

    promote = ["promote", "--model", cfg.registry.policy_name, "--version", "1", "--to", "production"]
    assert main([*promote, "--user", "carol", *config]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"error: cannot promote {cfg.registry.policy_name} version 1 to 'production': it never passed a "
        "non-forced promotion to 'staging'; promote it to 'staging' first, or pass --force with --reason TEXT"
    ]

    assert main([*promote, "--force", *config]) == 2
    assert "--force needs a non-empty --reason" in capsys.readouterr().err

    assert main([*promote, "--force", "--reason", "accepted risk", "--user", "carol", *config]) == 0
    assert "moved from no version to version 1 (forced: accepted risk)" in capsys.readouterr().out

    assert main(["models", "--name", cfg.registry.policy_name, *config]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["model", "ver", "aliases"]
    assert table[1].split()[:3] == [cfg.registry.policy_name, "1", "candidate,production"]

    assert main(["models", "--name", "nope", *config]) == 2
    assert "no registered model named 'nope'" in capsys.readouterr().err


def test_stage_rerun_reuses_every_version(cfg: PipelineConfig, tmp_path: Path) -> None:
    from safe_rlhf_v.stages import register

    uris = pipeline_outputs(cfg, tmp_path / "run", "run-1")
    first = register.run(cfg, **uris, pipeline_run_id="run-1")
    again = register.run(cfg, **uris, pipeline_run_id="run-1")
    assert again.metrics == {"created_versions": 0.0}
    assert again.details["versions"]["reward"] == first.details["versions"]["reward"] | {"created": False}
    assert first.details["candidate_alias"] == "candidate"


def test_register_finishes_the_parent_with_duration_and_headline(cfg: PipelineConfig, tmp_path: Path) -> None:
    from safe_rlhf_v.stages import register

    register.run(cfg, **pipeline_outputs(cfg, tmp_path, "p4"), pipeline_run_id="p4")
    experiment_id = tracking.configure(cfg.tracking, cfg.work_dir)
    parent = tracking.find_parent_run(experiment_id, "p4")
    assert parent is not None and parent.info.status == "FINISHED"
    assert parent.data.metrics["pipeline_duration_s"] >= 0
    assert parent.data.metrics["evaluation/trained/harmful_share"] == pytest.approx(0.1)
    assert all(run.info.status == "FINISHED" for run in MlflowClient().search_runs([experiment_id]))
