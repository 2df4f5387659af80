"""Registered versions are MLflow models: loadable by `mlflow.pyfunc`, with signatures, cards and views.

The store is filled by the register stage with real tiny models (`registered_run` in conftest), so
the loaded pyfunc runs the same Policy, scorers and guard the pipeline runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from registered_run import RegisteredRun

from safe_rlhf_v import registry, storage, tracking
from safe_rlhf_v.mlflow_models import (
    CARD_FILE,
    ModelFolderChanged,
    ModelInputError,
    encode_image,
    verified_folder,
)
from safe_rlhf_v.models.policy import GenerationSettings, Policy

IMAGES = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 160, 90))]
QUESTIONS = ["What is shown in this picture?", "Is this safe to eat?"]
ROLES = ("policy", "reward", "cost", "guard")


@pytest.fixture
def store(registered_run: RegisteredRun) -> MlflowClient:
    """The registered run's store, also as the process-wide URI `models:/` URIs resolve against."""
    mlflow.set_tracking_uri(registered_run.tracking_uri)
    return MlflowClient(registered_run.tracking_uri)


def frame(with_answer: bool = False) -> pd.DataFrame:
    columns = {"image": [encode_image(image) for image in IMAGES], "question": QUESTIONS}
    if with_answer:
        columns["answer"] = ["A red square.", "Yes, it is fresh fruit."]
    return pd.DataFrame(columns)


def test_the_candidate_policy_loads_and_answers_like_policy_generate(
    registered_run: RegisteredRun, store: MlflowClient
) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{registered_run.cfg.registry.policy_name}@candidate")
    answers = model.predict(frame())

    section = registered_run.cfg.guardrail
    settings = GenerationSettings.from_config(section.generation, batch_size=section.batch_size)
    expected = Policy(registered_run.folders["policy"], settings).generate(IMAGES, QUESTIONS)
    assert list(answers["answer"]) == expected
    assert all(answer for answer in answers["answer"]), answers
    assert set(answers["outcome"]) == {"unguarded"}

    guarded = model.predict(frame(), params={"guardrail": True})
    # The registered guard calls every request safe and every answer harmless: the first answers stand.
    assert list(guarded["outcome"]) == ["answered", "answered"]
    assert list(guarded["answer"]) == expected

    shorter = model.predict(frame(), params={"max_new_tokens": 2})
    assert all(len(a.split()) <= len(b.split()) for a, b in zip(shorter["answer"], expected, strict=True))


def test_every_version_has_the_pyfunc_flavour_and_its_signature(
    registered_run: RegisteredRun, store: MlflowClient
) -> None:
    expected = {
        "policy": (["image", "question"], ["answer", "outcome"]),
        "reward": (["image", "question", "answer"], ["score"]),
        "cost": (["image", "question", "answer"], ["score"]),
        "guard": (
            ["image", "question", "answer"],
            ["safe", "severity", "rating", "category", "request_severity"],
        ),
    }
    for role in ROLES:
        name = getattr(registered_run.cfg.registry, f"{role}_name")
        info = mlflow.models.get_model_info(f"models:/{name}/1")
        assert "python_function" in info.flavors
        assert (info.signature.inputs.input_names(), info.signature.outputs.input_names()) == expected[role]
        version = store.get_model_version(name, "1")
        assert registry.folder_of(version) == str(registered_run.folders[role])
    policy = mlflow.models.get_model_info(f"models:/{registered_run.cfg.registry.policy_name}/1")
    assert [param.name for param in policy.signature.params] == [
        "guardrail",
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
    ]


def test_reward_cost_and_guard_load_and_answer_their_frames(
    registered_run: RegisteredRun, store: MlflowClient
) -> None:
    names = registered_run.cfg.registry
    scores = mlflow.pyfunc.load_model(f"models:/{names.reward_name}/1").predict(frame(with_answer=True))
    assert list(scores.columns) == ["score"] and len(scores) == 2
    assert scores["score"].map(lambda value: isinstance(value, float)).all()
    verdicts = mlflow.pyfunc.load_model(f"models:/{names.guard_name}/1").predict(frame(with_answer=True))
    assert list(verdicts["safe"]) == [True, True]
    assert list(verdicts["request_severity"]) == ["safe", "safe"]
    assert list(verdicts["rating"]) == [3, 3]


def test_each_version_carries_a_card_naming_its_data_and_base_model(
    registered_run: RegisteredRun, store: MlflowClient, tmp_path: Path
) -> None:
    for role in ROLES:
        name = getattr(registered_run.cfg.registry, f"{role}_name")
        version = store.get_model_version(name, "1")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=str(tmp_path / role)
        )
        card = (Path(local) / CARD_FILE).read_text()
        assert (
            registered_run.data_sha256["train"] in card and registered_run.data_sha256["evaluation"] in card
        )
        assert str(registered_run.cfg.base_model) in card
        assert storage.sha256_dir(registered_run.folders[role]) in card
        assert "learning_rate" in card and "## Known limits" in card
        assert not (registered_run.folders[role] / CARD_FILE).exists(), "the user's folder is not written"
        assert not list(Path(local).rglob("*.safetensors")), "the weights are referenced, not copied"
    policy = store.get_model_version(registered_run.cfg.registry.policy_name, "1")
    local = mlflow.artifacts.download_artifacts(artifact_uri=policy.source, dst_path=str(tmp_path / "again"))
    card = (Path(local) / CARD_FILE).read_text()
    assert "| `evaluation/trained/cost` | -0.8 |" in card


def test_a_changed_folder_is_refused_at_load(registered_run: RegisteredRun, tmp_path: Path) -> None:
    copy = tmp_path / "reward"
    shutil.copytree(registered_run.folders["reward"], copy)
    config = {"role": "reward", "folder": str(copy), "sha256": storage.sha256_dir(copy)}
    assert verified_folder(config) == str(copy)
    (copy / "lineage.json").write_text("{}")
    with pytest.raises(ModelFolderChanged, match=r"reward model folder .* changed after registration"):
        verified_folder(config)
    with pytest.raises(ModelFolderChanged, match="does not exist any more"):
        verified_folder(config | {"folder": str(tmp_path / "gone")})


def test_bad_rows_name_the_row(registered_run: RegisteredRun, store: MlflowClient) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{registered_run.cfg.registry.policy_name}@candidate")
    bad_image = frame().assign(image=["not base64!", "aGVsbG8="])
    with pytest.raises(ModelInputError, match="row 0: image is not a base64-encoded PNG"):
        model.predict(bad_image)
    with pytest.raises(ModelInputError, match="row 1: question is empty"):
        model.predict(frame().assign(question=["fine", " "]))


def test_mlflow_views_open_on_runs_and_link_the_registered_versions(
    registered_run: RegisteredRun, store: MlflowClient
) -> None:
    experiment = store.get_experiment_by_name(registered_run.cfg.tracking.experiment)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    parent = tracking.find_parent_run(experiment.experiment_id, "run-1")
    assert parent.info.status == "FINISHED" and parent.info.end_time
    assert parent.data.metrics["pipeline_duration_s"] > 0
    assert parent.data.metrics["evaluation/trained/cost"] == -0.8
    names = registered_run.cfg.registry
    for name in (names.policy_name, names.reward_name, names.cost_name, names.guard_name):
        assert f"[{name} v1](#/models/{name}/versions/1)" in parent.data.tags[tracking.NOTE_TAG]
    policy = store.get_model_version(names.policy_name, "1")
    assert f"[{names.guard_name} v1](#/models/{names.guard_name}/versions/1)" in policy.description
    # The PPO run shows the reward and cost models it trained against as MLflow 3 model inputs.
    ppo = store.get_run(policy.run_id)
    upstream = {store.get_model_version(name, "1").source for name in (names.reward_name, names.cost_name)}
    assert {f"models:/{model.model_id}" for model in ppo.inputs.model_inputs} == upstream
