"""The typed records that pass between stages, and the names they use.

Stages hand each other folders, and the folders carry small JSON records: `lineage.json` (what a
model was trained from) and `result.json` (what a stage did). Both are read by later stages, the
registry and the pipeline's glue, often in another process or pod, so they are pydantic models:
a record with a missing or misspelt field is refused where it is read, instead of surfacing as a
`KeyError` several stages later. The stage and variant names are literals here, once, so a
misspelt name in a config (`resources: {train-rewrad: ...}`) is an error instead of a silent
default.

This module imports nothing else of the project: config, stages, registry and the pipeline glue
all build on it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from safe_rlhf_v.errors import UserError

StageName = Literal[
    "validate-data",
    "train-reward",
    "train-cost",
    "train-guard",
    "train-ppo-lag",
    "evaluate",
    "register",
]
"""Every stage of the pipeline, as the CLI, the config's `resources` keys and MLflow tags name it."""

STAGES: tuple[StageName, ...] = get_args(StageName)

Variant = Literal["safe-rlhf-v", "reward-only", "fixed-lambda"]
"""What `train-ppo-lag` optimizes: the Lagrangian method, or one of its two ablations."""

VARIANTS: tuple[Variant, ...] = get_args(Variant)
MAIN_VARIANT: Variant = "safe-rlhf-v"

ModelKind = Literal["reward", "cost", "guard", "policy"]

RESULT_FILE = "result.json"
LINEAGE_FILE = "lineage.json"


class RecordError(UserError, ValueError):
    """A `result.json` or `lineage.json` that is not a well-formed record; names the file."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, text: str, where: str) -> Any:
        """Parse a record read from `where`, turning a malformed one into a one-line `RecordError`."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            first = error.errors()[0]
            field = ".".join(str(part) for part in first["loc"]) or "(record)"
            raise RecordError(
                f"{where} is not a valid {cls.__name__} record: {field}: {first['msg']}"
            ) from None


class Lineage(_Record):
    """What a model folder was trained from: data digests, starting models, the run that made it."""

    stage: StageName
    kind: ModelKind
    pipeline_run_id: str = Field(min_length=1)
    mlflow_run_id: str = Field(min_length=1)
    data_uri: str
    data_sha256: dict[Literal["train", "evaluation"], str]
    base_model: str
    base_model_sha256: str
    variant: Variant | None = None
    reward_model: str | None = None
    reward_model_sha256: str | None = None
    cost_model: str | None = None
    cost_model_sha256: str | None = None


class StageResult(_Record):
    """The small record a stage returns and leaves in its output folder: status, headline figures,
    where its outputs went and stage-specific details."""

    stage: StageName
    status: Literal["succeeded", "failed"]
    metrics: dict[str, float] = Field(default_factory=dict)
    outputs: dict[str, str] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    pipeline_run_id: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = RESULT_FILE) -> StageResult:
        result: StageResult = cls.parse(text, where)
        return result
