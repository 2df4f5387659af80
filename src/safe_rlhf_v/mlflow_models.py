"""The registered models as MLflow models: pyfunc wrappers MLflow can load, with signatures and cards.

A registered version is an MLflow 3 *logged model* whose `python_function` flavour answers frames:

| role | inputs | outputs |
|---|---|---|
| policy | `image` (base64 PNG), `question` | `answer`, `outcome` |
| reward, cost | `image`, `question`, `answer` | `score` |
| guard | `image`, `question`, `answer` | `safe`, `severity`, `rating`, `category`, `request_severity` |

**The weights are referenced, not copied.** The logged model holds its MLmodel, a model card
(`README.md`) and a few lines of code; its `model_config` names the safetensors folder (an `s3://`
prefix in a cluster, an absolute folder locally) with the folder's sha256. A 7B policy and its three
7B judges are about 60 GB: copying them into the MLflow artifact store would double that on every
run, and the folder is already durable (`registry.publish_uri`) and already the thing the registry
keys versions by. The price is that the folder must outlive the version, so loading re-hashes it and
refuses bytes that are not the registered ones (`ModelFolderChanged`) instead of silently serving
another model.

No pickle: the pyfunc is logged "from code" (`mlflow_model_code.py`, which names a class of this
module), so loading imports this installed package instead of unpickling an object from the artifact
store. The loading environment is the project's image (`pip_requirements` pins what it runs on).

The policy's `params` pick decoding settings per call, and `guardrail=True` puts the multi-level
guardrail in front, with the guard version the policy was registered and evaluated with.
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
import threading
import warnings
from collections.abc import Mapping
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image, UnidentifiedImageError

from safe_rlhf_v import storage
from safe_rlhf_v.errors import UserError

if TYPE_CHECKING:
    from safe_rlhf_v.config import PipelineConfig

CODE_FILE = Path(__file__).with_name("mlflow_model_code.py")
CARD_FILE = "README.md"
FOLDER_TAG = "model_folder"
"""The tag (on the logged model and its registered version) naming the referenced weights' folder."""
CACHE_ROOT = Path.home() / ".cache" / "safe-rlhf-v"
"""Where a loaded model's `s3://` folder is downloaded (the loader has no pipeline work dir)."""
_REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "pillow", "pandas")

_IMAGE = ColSpec("string", "image")
_QUESTION = ColSpec("string", "question")
_ANSWER = ColSpec("string", "answer")
SIGNATURES: dict[str, ModelSignature] = {
    "policy": ModelSignature(
        inputs=Schema([_IMAGE, _QUESTION]),
        outputs=Schema([_ANSWER, ColSpec("string", "outcome")]),
        params=ParamSchema(
            [
                ParamSpec("guardrail", "boolean", False),
                ParamSpec("max_new_tokens", "long", 0),
                ParamSpec("temperature", "double", -1.0),
                ParamSpec("top_p", "double", -1.0),
                ParamSpec("seed", "long", -1),
            ]
        ),
    ),
    "reward": ModelSignature(
        inputs=Schema([_IMAGE, _QUESTION, _ANSWER]), outputs=Schema([ColSpec("double", "score")])
    ),
    "cost": ModelSignature(
        inputs=Schema([_IMAGE, _QUESTION, _ANSWER]), outputs=Schema([ColSpec("double", "score")])
    ),
    "guard": ModelSignature(
        inputs=Schema([_IMAGE, _QUESTION, _ANSWER]),
        outputs=Schema(
            [
                ColSpec("boolean", "safe"),
                ColSpec("string", "severity"),
                ColSpec("long", "rating"),
                ColSpec("string", "category"),
                ColSpec("string", "request_severity"),
            ]
        ),
    ),
}
"""Each role's frame in and out. The policy's params default to "unset" values (0, -1), which mean
the decoding settings it was registered with: a ParamSpec cannot default to None."""

KNOWN_LIMITS = {
    "policy": [
        "Answers one image and one question per row; no multi-turn conversation.",
        "Its figures are on the reward and cost models it was trained against, which it was optimised "
        "to please: the promotion gate prefers an exact or external judge where the evaluation had one.",
        "Without `guardrail=True` nothing filters what it says; the cost budget bounds expected harm, "
        "not every answer.",
    ],
    "reward": [
        "Scores are on its own scale (higher is more helpful); compare only scores of this version.",
        "Learned from the preference data named here; it rewards what that data rewards.",
    ],
    "cost": [
        "Cost > 0 means harmful under its training data's labels; the threshold is not calibrated.",
        "A policy trained against it may exploit it: do not use it alone as the judge of that policy.",
    ],
    "guard": [
        "Severity and categories are those of its training data's taxonomy.",
        "A learned classifier: it misses some harmful answers and refuses some safe requests.",
    ],
}


class ModelInputError(UserError, ValueError):
    """A row the model cannot read (an image that is not base64 PNG/JPEG, an empty question)."""


class ModelFolderChanged(UserError, RuntimeError):
    """The folder a logged model references no longer holds the bytes that were registered."""


# ---------------------------------------------------------------------------------- logging


def requirements() -> list[str]:
    """Pins of what the model ran on here: given explicitly, since MLflow would otherwise infer them by
    loading the model in a subprocess (minutes for a 7B model). The project itself comes from the image."""
    return [f"{name}=={metadata.version(name)}" for name in _REQUIREMENTS]


def model_config(cfg: PipelineConfig, role: str, folder: str, sha256: str) -> dict[str, Any]:
    """What the pyfunc needs to load and run `role` from `folder`: the digest it must hash to, and the
    inference settings of the config the run was trained and evaluated under."""
    config: dict[str, Any] = {"role": role, "folder": folder, "sha256": sha256}
    if role == "policy":
        config["guardrail"] = cfg.guardrail.model_dump(mode="json")
    elif role in ("reward", "cost"):
        config |= {
            "batch_size": cfg.evaluate.batch_size,
            "max_length": getattr(cfg, f"train_{role}").max_length,
        }
    else:
        config |= {"batch_size": cfg.evaluate.batch_size, "max_length": cfg.train_guard.max_length}
    return config


def _table(rows: Mapping[str, Any]) -> list[str]:
    if not rows:
        return ["(none recorded)"]
    return ["| name | value |", "|---|---|"] + [
        f"| `{key}` | {value} |" for key, value in sorted(rows.items())
    ]


def model_card(
    role: str,
    lineage: Mapping[str, Any],
    sha256: str,
    folder: str,
    *,
    training_params: Mapping[str, str],
    training_metrics: Mapping[str, float],
    evaluation: Mapping[str, float],
) -> str:
    """The version's README: where the bytes came from, how they were trained, how they scored, and
    what not to trust them for, so a reviewer on the version page needs nothing else to judge it."""
    lines = [
        f"# Safe RLHF-V {role} model",
        "",
        f"Trained by `{lineage['stage']}` in pipeline run `{lineage['pipeline_run_id']}` "
        f"(MLflow run `{lineage['mlflow_run_id']}`).",
        "",
        "## Provenance",
        "",
        f"- weights: `{folder}` (safetensors, referenced, not copied), sha256 `{sha256}`",
        f"- base model: `{lineage['base_model']}` (`{lineage['base_model_sha256']}`)",
        f"- data: `{lineage['data_uri']}`",
    ]
    lines += [
        f"  - {split} split sha256 `{digest}`" for split, digest in sorted(lineage["data_sha256"].items())
    ]
    for upstream in ("reward", "cost"):
        if lineage.get(f"{upstream}_model_sha256"):
            lines.append(
                f"- trained against the {upstream} model with sha256 `{lineage[f'{upstream}_model_sha256']}`"
            )
    lines += ["", "## Training settings", "", *_table(training_params), "", "## Training figures", ""]
    lines += _table({key: f"{value:.4g}" for key, value in training_metrics.items()})
    if evaluation:
        lines += ["", "## Evaluation (held-out prompts)", ""]
        lines += _table({key: f"{value:.4g}" for key, value in evaluation.items()})
    lines += ["", "## Known limits", "", *[f"- {limit}" for limit in KNOWN_LIMITS[role]], ""]
    return "\n".join(lines)


def log_registered_model(
    client: MlflowClient, role: str, *, source_run_id: str, config: Mapping[str, Any], card: str
) -> LoggedModel:
    """Log `role` as an MLflow 3 logged model in the experiment (and as an output) of the run that
    trained it.

    Written through `client` (the registry's store) rather than the fluent API, which would log to
    whatever store and experiment the process last selected. The card lands at the model's root.
    """
    experiment_id = client.get_run(source_run_id).info.experiment_id
    tags = {"model_sha256": str(config["sha256"]), FOLDER_TAG: str(config["folder"])}
    logged = client.create_logged_model(
        experiment_id, name=role, source_run_id=source_run_id, tags=tags, model_type=f"safe-rlhf-v-{role}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        meta = Model(
            artifact_path=logged.artifact_location,
            model_uuid=logged.model_id,
            run_id=source_run_id,
            model_id=logged.model_id,
        )
        with warnings.catch_warnings():
            # MLflow asks for an input example, which it would check by running the model: loading
            # a 7B model at registration; the signature is given instead.
            warnings.filterwarnings(
                "ignore", message=".*input example was not provided", category=UserWarning
            )
            mlflow.pyfunc.save_model(
                path,
                python_model=str(CODE_FILE),
                model_config=dict(config),
                signature=SIGNATURES[role],
                pip_requirements=requirements(),
                mlflow_model=meta,
            )
        (path / CARD_FILE).write_text(card)
        client.log_model_artifacts(logged.model_id, str(path))
    # The training run's page then lists the model under "Logged models".
    client.log_outputs(source_run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


# ---------------------------------------------------------------------------------- loading


def decode_image(value: object, row: int) -> Image.Image:
    """A base64 PNG (or JPEG) cell as an RGB image; a `data:` URL prefix is accepted."""
    if not isinstance(value, str) or not value:
        raise ModelInputError(
            f"row {row}: image must be a base64-encoded PNG string, got {type(value).__name__}"
        )
    encoded = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
        return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise ModelInputError(f"row {row}: image is not a base64-encoded PNG ({error})") from None


def encode_image(image: Image.Image) -> str:
    """An image as the base64 PNG string the models' `image` column takes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _column(frame: pd.DataFrame, name: str) -> list[str]:
    if name not in frame.columns:
        raise ModelInputError(f"input has no {name!r} column; columns: {', '.join(map(str, frame.columns))}")
    values = frame[name].tolist()
    for row, value in enumerate(values):
        if name == "question" and (not isinstance(value, str) or not value.strip()):
            raise ModelInputError(f"row {row}: question is empty")
    return [str(value) for value in values]


def _rows(frame: pd.DataFrame, with_answer: bool) -> tuple[list[Image.Image], list[str], list[str]]:
    images = [decode_image(value, row) for row, value in enumerate(frame["image"].tolist())]
    return images, _column(frame, "question"), _column(frame, "answer") if with_answer else []


def verified_folder(config: Mapping[str, Any]) -> str:
    """The referenced folder on this machine, checked to hash to the registered digest."""
    from safe_rlhf_v.stages.context import local_model

    folder = local_model(str(config["folder"]), CACHE_ROOT)
    if not Path(folder).is_dir():
        raise ModelFolderChanged(f"{config['role']} model folder {config['folder']} does not exist any more")
    digest = storage.sha256_dir(Path(folder))
    if digest != config["sha256"]:
        raise ModelFolderChanged(
            f"{config['role']} model folder {config['folder']} has sha256 {digest}, not the registered "
            f"{config['sha256']}: it changed after registration; register the new bytes as a new version"
        )
    return folder


class SafeRlhfVModel(PythonModel):
    """One class for the four roles, chosen by `model_config["role"]`: the code file MLflow runs to
    build the model cannot know the role, only the config it is loaded with can."""

    def load_context(self, context: PythonModelContext) -> None:
        """Load the role's model from its verified folder (the guard lazily, on the first guarded call)."""
        self.config = dict(context.model_config)
        folder = verified_folder(self.config)
        role = self.config["role"]
        self._lock = threading.Lock()
        if role == "policy":
            from safe_rlhf_v.config import GuardrailConfig
            from safe_rlhf_v.models.policy import GenerationSettings, Policy

            self.guardrail_config = GuardrailConfig.model_validate(self.config["guardrail"])
            settings = GenerationSettings.from_config(
                self.guardrail_config.generation, batch_size=self.guardrail_config.batch_size
            )
            self.policy = Policy(folder, settings)
            self.defaults = settings
            self.guard: Any = None
        elif role in ("reward", "cost"):
            from safe_rlhf_v.evaluate.scoring import AnswerScorer

            self.scorer = AnswerScorer(
                folder, batch_size=self.config["batch_size"], max_length=self.config["max_length"]
            )
        else:
            from safe_rlhf_v.models.judge import GuardJudge

            self.judge = GuardJudge(
                folder, batch_size=self.config["batch_size"], max_length=self.config["max_length"]
            )

    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Answer, score or judge every row, in order."""
        role = self.config["role"]
        with self._lock:
            if role == "policy":
                return self._answer(model_input, params or {})
            images, questions, answers = _rows(model_input, with_answer=True)
            if role in ("reward", "cost"):
                return pd.DataFrame({"score": self.scorer.score(images, questions, answers)})
            return self._judge(images, questions, answers)

    def _answer(self, frame: pd.DataFrame, params: Mapping[str, Any]) -> pd.DataFrame:
        images, questions, _ = _rows(frame, with_answer=False)
        defaults = self.defaults
        self.policy.settings = replace(
            defaults,
            max_new_tokens=int(params.get("max_new_tokens") or defaults.max_new_tokens),
            temperature=_unset_or(params.get("temperature"), defaults.temperature),
            top_p=_unset_or(params.get("top_p"), defaults.top_p),
            seed=_unset_or(params.get("seed"), defaults.seed),
        )
        if not params.get("guardrail"):
            return pd.DataFrame({"answer": self.policy.generate(images, questions), "outcome": "unguarded"})
        from safe_rlhf_v.guardrail import Guardrail

        settings = self.guardrail_config
        traces = Guardrail(
            self.policy, self._guard(), rounds=settings.rounds, refuse_severities=settings.refuse_severities
        ).run(images, questions)
        return pd.DataFrame({"answer": [t.answer for t in traces], "outcome": [t.outcome for t in traces]})

    def _guard(self) -> Any:
        """The guard the policy was registered with, loaded on first use: plain answers never need it."""
        if self.guard is None:
            from safe_rlhf_v.models.judge import GuardJudge

            guard = self.config.get("guard")
            if not guard:
                raise ModelInputError("guardrail=True, but this policy was registered without a guard")
            self.guard = GuardJudge(verified_folder(guard), batch_size=self.guardrail_config.batch_size)
        return self.guard

    def _judge(self, images: list[Image.Image], questions: list[str], answers: list[str]) -> pd.DataFrame:
        verdicts = self.judge.judge_answers(images, questions, answers)
        requests = self.judge.judge_queries(images, questions)
        return pd.DataFrame(
            {
                "safe": [v.safe for v in verdicts],
                "severity": [v.severity for v in verdicts],
                "rating": [v.rating for v in verdicts],
                "category": [v.category for v in verdicts],
                "request_severity": [q.severity for q in requests],
            }
        )


def _unset_or(value: float | None, default: Any) -> Any:
    """A param's value, or the registered default when the caller left it at its "unset" (< 0) value."""
    return default if value is None or value < 0 else value
