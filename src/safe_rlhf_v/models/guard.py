"""Beaver-Guard-V: a VLM backbone with classification heads that judge answers and queries.

The paper's guard moderates both sides of a conversation: it rates an answer (image, question,
answer) on the 7-point harmlessness scale of the BeaverTails-V judge (-3..+3; safe iff >= 0, and
-1/-2/-3 are the minor/moderate/severe levels of :func:`schema.severity_from_rate`) together with
its harm category, and it flags a request (image + question, no answer yet) as unsafe, so that a
guardrail can refuse a severe query before generating and re-generate an unsafe answer after.

Three linear heads read the backbone's hidden state at each sequence's last *real* token (from the
attention mask, as in :mod:`safe_rlhf_v.models.score`, so any padding side gives the same logits):

- ``rating``: 7 classes, class ``i`` is the rating ``RATINGS[i]`` (-3..+3);
- ``category``: one class per harm category (the 20 BeaverTails-V categories by default);
- ``query``: 4 classes, ``QUERY_LABELS`` = the request's severity (safe, minor, moderate, severe).

Every head is computed for every sequence (they cost a matmul each); which logits mean something
depends on the input: ``rating`` and ``category`` on a full conversation, ``query`` on a
prompt-only sequence (image + question + the template's generation prompt).

On disk a guard is a Hugging Face folder of the backbone (safetensors), plus
``guard_heads.safetensors`` and ``guard_config.json`` (kind "guard", format version, base model,
hidden size and the label map of every head), plus the processor, so the folder alone is enough to
judge new data.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import deepspeed
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, PreTrainedModel, ProcessorMixin

from safe_rlhf_v.data.schema import CATEGORIES, HARMLESS_RATE_RANGE, SEVERITIES, Severity, severity_from_rate
from safe_rlhf_v.models.loading import ModelFolderError, ModelFolderMissing, load_model
from safe_rlhf_v.models.score import CONFIG_FILE as SCORE_CONFIG_FILE
from safe_rlhf_v.models.score import ScoreModel, backbone_hidden, backbone_state, last_token_index

KIND: Final = "guard"
HEADS_FILE: Final = "guard_heads.safetensors"
CONFIG_FILE: Final = "guard_config.json"
FORMAT_VERSION: Final = 1
RATINGS: Final[tuple[int, ...]] = tuple(range(HARMLESS_RATE_RANGE[0], HARMLESS_RATE_RANGE[1] + 1))
QUERY_LABELS: Final[tuple[Severity, ...]] = SEVERITIES  # request severity: safe, minor, moderate, severe
HEAD_NAMES: Final[tuple[str, ...]] = ("rating", "category", "query")


@dataclass(frozen=True)
class GuardOutput:
    """Logits of every head at each sequence's last real token, shape (B, classes)."""

    rating_logits: torch.Tensor
    category_logits: torch.Tensor
    query_logits: torch.Tensor
    end_index: torch.Tensor


@dataclass(frozen=True)
class ResponseVerdict:
    """The guard's judgement of one answer.

    ``unsafe_probability`` is the rating head's probability mass on the negative ratings: a
    guardrail can threshold it to trade recall for precision, where ``safe`` is the plain argmax.
    """

    rating: int
    safe: bool
    severity: Severity
    category: str
    unsafe_probability: float


def ratings_from_logits(rating_logits: torch.Tensor) -> torch.Tensor:
    """The most likely harmlessness rating (-3..+3) of each row of (B, 7) logits."""
    if rating_logits.dim() != 2 or rating_logits.size(1) != len(RATINGS):
        raise ValueError(
            f"rating logits must have shape (batch, {len(RATINGS)}), got {tuple(rating_logits.shape)}"
        )
    return rating_logits.argmax(dim=1) + RATINGS[0]


def unsafe_probability(rating_logits: torch.Tensor) -> torch.Tensor:
    """P(rating < 0) per row: the softmax mass of the harmful ratings."""
    harmful = torch.tensor([rating < 0 for rating in RATINGS], device=rating_logits.device)
    return rating_logits.float().softmax(dim=1)[:, harmful].sum(dim=1)


def query_unsafe_probability(query_logits: torch.Tensor) -> torch.Tensor:
    """P(request is not safe) per row of the query head's (B, 4) logits (prompt-only sequences)."""
    return 1.0 - query_logits.float().softmax(dim=1)[:, QUERY_LABELS.index("safe")]


def query_severities(query_logits: torch.Tensor) -> list[Severity]:
    """The most likely request severity (safe, minor, moderate, severe) of each row."""
    return [QUERY_LABELS[int(i)] for i in query_logits.argmax(dim=1)]


def _check_categories(categories: Sequence[str], where: str) -> tuple[str, ...]:
    names = tuple(categories)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"{where}: categories must be a non-empty list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"{where}: categories must be unique, {duplicates} repeat")
    return names


def _describe_folder(folder: Path) -> str:
    """What a folder that is not a guard looks like, for the error message."""
    if (folder / SCORE_CONFIG_FILE).is_file():
        kind = json.loads((folder / SCORE_CONFIG_FILE).read_text()).get("kind")
        return f"a score model (kind {kind!r}, {SCORE_CONFIG_FILE}); load it with ScoreModel.load"
    if (folder / "config.json").is_file():
        architectures = json.loads((folder / "config.json").read_text()).get("architectures")
        return (
            f"a plain Hugging Face checkpoint ({architectures}); give it new heads with GuardModel.from_base"
        )
    return "an empty or unrelated folder"


def read_guard_config(folder: Path) -> dict[str, Any]:
    """The ``guard_config.json`` of a guard folder, checked; a clear error for any other folder."""
    if not folder.is_dir():
        raise ModelFolderMissing(f"guard model folder {folder} does not exist")
    missing = [name for name in (CONFIG_FILE, HEADS_FILE) if not (folder / name).is_file()]
    if missing:
        raise ModelFolderError(
            f"{folder} is not a guard model: it lacks {missing}; it looks like {_describe_folder(folder)}"
        )
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    if config.get("kind") != KIND:
        raise ModelFolderError(f"{path}: kind must be {KIND!r}, got {config.get('kind')!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: format_version {config.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    labels = config.get("labels")
    if not isinstance(labels, dict):
        raise ModelFolderError(f"{path}: 'labels' must map each head {list(HEAD_NAMES)} to its label list")
    expected = {"rating": list(RATINGS), "query": list(QUERY_LABELS)}
    for head, names in expected.items():
        if labels.get(head) != names:
            raise ModelFolderError(f"{path}: labels.{head} must be {names}, got {labels.get(head)!r}")
    categories = labels.get("category")
    if not isinstance(categories, list):
        raise ModelFolderError(
            f"{path}: labels.category must be a list of category names, got {categories!r}"
        )
    _check_categories(categories, f"{path}: labels.category")
    return config


class GuardModel(torch.nn.Module):
    """A backbone and three linear heads (rating, category, query) read at the last real token."""

    def __init__(
        self, backbone: PreTrainedModel, *, categories: Sequence[str] = CATEGORIES, base_model: str = ""
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.categories = _check_categories(categories, "GuardModel")
        self.base_model = base_model
        hidden_size = backbone.config.get_text_config().hidden_size
        sizes = {"rating": len(RATINGS), "category": len(self.categories), "query": len(QUERY_LABELS)}
        self.heads = torch.nn.ModuleDict(
            {
                name: torch.nn.Linear(
                    hidden_size, size, bias=True, dtype=backbone.dtype, device=backbone.device
                )
                for name, size in sizes.items()
            }
        )
        # N(0, 1/(hidden+1)) weights and zero biases keep the initial logits O(1) and the initial
        # class probabilities near uniform, as for the score head. Under ZeRO-3 the heads were
        # partitioned when created: they are gathered for the initialisation (rank 0's values are
        # broadcast on exit); without ZeRO-3 the context does nothing.
        with deepspeed.zero.GatheredParameters(list(self.heads.parameters()), modifier_rank=0):
            for head in self.heads.values():
                torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden_size + 1))
                torch.nn.init.zeros_(head.bias)

    @property
    def hidden_size(self) -> int:
        return self.heads["rating"].in_features

    @classmethod
    def from_base(
        cls,
        path: str | Path,
        *,
        categories: Sequence[str] = CATEGORIES,
        freeze_vision_tower: bool = True,
        freeze_projector: bool = False,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> GuardModel:
        """Fresh heads on the base model of the checkpoint at ``path`` (a guard's or score model's
        folder works too: its backbone is reused, its heads ignored)."""
        backbone = load_model(AutoModel, path, dtype=dtype, trust_remote_code=trust_remote_code)
        model = cls(backbone, categories=categories, base_model=str(path))
        model.prepare_training(freeze_vision_tower=freeze_vision_tower, freeze_projector=freeze_projector)
        return model

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        freeze_vision_tower: bool = True,
        freeze_projector: bool = False,
        trust_remote_code: bool = False,
    ) -> GuardModel:
        """A guard saved by :meth:`save`, heads and label maps included."""
        folder = Path(path)
        config = read_guard_config(folder)
        backbone = load_model(AutoModel, folder, dtype=dtype, trust_remote_code=trust_remote_code)
        model = cls(
            backbone, categories=config["labels"]["category"], base_model=config.get("base_model", "")
        )
        if config.get("hidden_size") != model.hidden_size:
            raise ModelFolderError(
                f"{folder / CONFIG_FILE}: hidden_size {config.get('hidden_size')} does not match the "
                f"backbone's {model.hidden_size}"
            )
        model._load_heads(load_file(folder / HEADS_FILE), folder / HEADS_FILE)
        model.prepare_training(freeze_vision_tower=freeze_vision_tower, freeze_projector=freeze_projector)
        return model

    def _load_heads(self, tensors: Mapping[str, torch.Tensor], source: Path) -> None:
        expected = {
            f"{name}.{param}": p.shape
            for name, head in self.heads.items()
            for param, p in head.named_parameters()
        }
        if set(tensors) != set(expected):
            raise ModelFolderError(f"{source} must hold {sorted(expected)}, found {sorted(tensors)}")
        for key, shape in expected.items():
            if tensors[key].shape != shape:
                raise ModelFolderError(
                    f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                    f"the label map needs {tuple(shape)}"
                )
        self.heads.load_state_dict(tensors)

    def prepare_training(
        self, *, freeze_vision_tower: bool, freeze_projector: bool, gradient_checkpointing: bool = False
    ) -> None:
        """Freeze the image encoder and/or projector, with the score model's rules for every family.

        The freezing code only touches ``self.backbone``, so it is the score model's own function
        applied here rather than a second copy of it.
        """
        ScoreModel.prepare_training(
            self,  # type: ignore[arg-type]
            freeze_vision_tower=freeze_vision_tower,
            freeze_projector=freeze_projector,
            gradient_checkpointing=gradient_checkpointing,
        )

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """What the training Engine calls when ``gradient_checkpointing`` is on: the heads hold no
        activations worth recomputing, so this is the backbone's checkpointing."""
        self.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **model_inputs: Any,
    ) -> GuardOutput:
        """Logits of every head; ``model_inputs`` carries extra processor outputs (``image_grid_thw``,
        ``image_sizes``, ...) to the backbone."""
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, pixel_values, **model_inputs)
        end_index = last_token_index(attention_mask)
        end_hidden = hidden[torch.arange(hidden.size(0), device=hidden.device), end_index]
        return GuardOutput(
            rating_logits=self.heads["rating"](end_hidden),
            category_logits=self.heads["category"](end_hidden),
            query_logits=self.heads["query"](end_hidden),
            end_index=end_index,
        )

    def verdicts(self, output: GuardOutput) -> list[ResponseVerdict]:
        """Labels for each row of ``output`` computed on full conversations (image, question, answer)."""
        ratings = ratings_from_logits(output.rating_logits).tolist()
        harmful = unsafe_probability(output.rating_logits).tolist()
        categories = output.category_logits.argmax(dim=1).tolist()
        return [
            ResponseVerdict(
                rating=rating,
                safe=rating >= 0,
                severity=severity_from_rate(rating),
                category=self.categories[category],
                unsafe_probability=probability,
            )
            for rating, probability, category in zip(ratings, harmful, categories, strict=True)
        ]

    def guard_config(self) -> dict[str, Any]:
        """What ``guard_config.json`` records: the label map of each head and where it came from."""
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "hidden_size": self.hidden_size,
            "labels": {
                "rating": list(RATINGS),
                "category": list(self.categories),
                "query": list(QUERY_LABELS),
            },
            "severity": "rating >= 0 safe, -1 minor, -2 moderate, -3 severe",
        }

    def save(
        self,
        out_dir: Path,
        *,
        processor: ProcessorMixin | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Write the backbone, heads, guard config and (when given) the processor into ``out_dir``.

        ``state_dict`` (keys as in ``self.state_dict()``) replaces the module's own weights, for
        DeepSpeed ZeRO-3 callers that gathered the partitioned parameters first.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        heads = {
            key.removeprefix("heads."): tensor.detach().cpu().contiguous()
            for key, tensor in state.items()
            if key.startswith("heads.")
        }
        expected = {f"{name}.{param}" for name in HEAD_NAMES for param in ("weight", "bias")}
        if set(heads) != expected:
            raise ValueError(
                f"state_dict must hold heads.{{{', '.join(sorted(expected))}}}, got {sorted(heads)}"
            )
        self.backbone.save_pretrained(out_dir, state_dict=backbone_state(state_dict))
        save_file(heads, str(out_dir / HEADS_FILE), metadata={"format": "pt"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(self.guard_config(), indent=2, sort_keys=True) + "\n")
        if processor is not None:
            processor.save_pretrained(out_dir)
