"""Score models: a VLM's base model plus a linear head to one scalar per token.

The reward model (RM-V), the cost model (CM-V) and the two PPO critics share this class; only
their training signal and the meaning of the sign differ, which ``kind`` and ``sign_convention``
record. The backbone is whatever ``AutoModel`` gives for an image-text-to-text checkpoint (e.g.
``LlavaModel``, ``Qwen2VLModel``): its ``last_hidden_state`` feeds the head.

The sequence score is read at each row's last *real* token, found from the attention mask, so it
is the same under left padding (rollouts), right padding (preference batches) and no padding.
The reference implementation reads position -1 of the batch, which under right padding is a pad
token for every row but the longest (research notes §2.4, §2.7).

On disk a score model is an ordinary Hugging Face folder of the backbone (safetensors), plus
``score_head.safetensors`` and ``score_config.json``, plus the processor when one was given, so
the folder alone is enough to score new data.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, NamedTuple, get_args

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, PreTrainedModel, ProcessorMixin

from safe_rlhf_v.models.family import family_of
from safe_rlhf_v.models.loading import ModelFolderError, ModelFolderMissing, load_model

ScoreKind = Literal["reward", "cost", "critic"]
SCORE_KINDS: Final[tuple[str, ...]] = get_args(ScoreKind)
SIGN_CONVENTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "reward": "higher is more helpful",
        "cost": "cost > 0 means harmful",
        "critic": "expected sum of the future reward (reward critic) or cost (cost critic) from this token",
    }
)
HEAD_FILE: Final = "score_head.safetensors"
CONFIG_FILE: Final = "score_config.json"
FORMAT_VERSION: Final = 1


class ScoreOutput(NamedTuple):
    """Per-token scores (critics) and the sequence score at each row's last real token.

    A named tuple rather than a dataclass: DeepSpeed's ZeRO-3 hooks look for the tensors in a
    module's output, and they only see into tuples, lists and dicts.
    """

    scores: torch.Tensor
    end_scores: torch.Tensor
    end_index: torch.Tensor


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last ``1`` in each row of a (B, L) mask, for any padding side, loop-free."""
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2-D (batch, length), got shape {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()
    empty = (~real.any(dim=1)).nonzero().flatten()
    if len(empty):
        raise ValueError(f"attention_mask rows {empty.tolist()} have no real token to read a score from")
    positions = torch.arange(real.size(1), device=real.device).expand_as(real)
    return positions.masked_fill(~real, -1).amax(dim=1)


@contextlib.contextmanager
def writable_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Make `module`'s parameters whole for writing (initialising, loading) inside the block.

    Under DeepSpeed ZeRO-3 (`deepspeed.zero.Init`) a parameter is partitioned as soon as its module
    is built, so its local tensor is empty and writing to it fails or does nothing. DeepSpeed's
    `GatheredParameters` with `modifier_rank=0` gathers them, and on exit re-partitions rank 0's
    values to every rank. Without partitioned parameters this does nothing, and DeepSpeed, whose
    import picks the accelerator, is not imported.
    """
    partitioned = [param for param in module.parameters() if hasattr(param, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed  # already loaded: only it puts ds_id on parameters

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
        yield


def _check_kind(kind: str) -> None:
    if kind not in SCORE_KINDS:
        raise ValueError(f"score model kind must be one of {SCORE_KINDS}, got {kind!r}")


def _find_submodule(backbone: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module | None:
    for name in names:
        try:
            return backbone.get_submodule(name)
        except AttributeError:
            continue
    return None


def backbone_hidden(
    backbone: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    **model_inputs: Any,
) -> torch.Tensor:
    """The backbone's last hidden states (B, L, H) for models with heads (score model, guard);
    extra processor outputs (``image_grid_thw``, ``image_sizes``, ...) pass through."""
    model_inputs.setdefault("use_cache", False)  # no generation here: a KV cache only costs memory
    return backbone(
        input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, **model_inputs
    ).last_hidden_state


def backbone_state(state_dict: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """The `backbone.*` weights of a model-with-heads state dict, keyed as the backbone names them
    (None passes through: save the live backbone). Shared by the score model and the guard."""
    if state_dict is None:
        return None
    weights = {
        key.removeprefix("backbone."): t for key, t in state_dict.items() if key.startswith("backbone.")
    }
    if not weights:
        raise ValueError("state_dict holds no backbone.* weights")
    return weights


def read_score_config(folder: Path) -> dict[str, Any]:
    """The ``score_config.json`` of a score model folder, with a clear error for anything else."""
    if not folder.is_dir():
        raise ModelFolderMissing(f"score model folder {folder} does not exist")
    missing = [name for name in (CONFIG_FILE, HEAD_FILE) if not (folder / name).is_file()]
    if missing:
        what = "an empty or unrelated folder"
        if (folder / "config.json").is_file():
            architectures = json.loads((folder / "config.json").read_text()).get("architectures")
            what = f"a plain Hugging Face checkpoint ({architectures})"
        raise ModelFolderError(
            f"{folder} is not a score model: it lacks {missing}; it looks like {what}. "
            "Put a new head on it with ScoreModel.from_base"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(
            f"{folder / CONFIG_FILE}: format_version {config.get('format_version')!r} is not supported "
            f"(expected {FORMAT_VERSION})"
        )
    if config.get("kind") not in SCORE_KINDS:
        raise ModelFolderError(
            f"{folder / CONFIG_FILE}: kind must be one of {SCORE_KINDS}, got {config.get('kind')!r}"
        )
    return config


class ScoreModel(torch.nn.Module):
    """A backbone and a ``Linear(hidden, 1)`` head; ``forward`` gives per-token and end scores."""

    def __init__(self, backbone: PreTrainedModel, kind: ScoreKind, *, base_model: str = "") -> None:
        super().__init__()
        _check_kind(kind)
        self.backbone = backbone
        self.kind: ScoreKind = kind
        self.base_model = base_model
        hidden_size = backbone.config.get_text_config().hidden_size
        self.score_head = torch.nn.Linear(
            hidden_size, 1, bias=True, dtype=backbone.dtype, device=backbone.device
        )
        # N(0, 1/(hidden+1)) is the reward-head initialisation of Stiennon et al. (2020): with the
        # backbone's final norm keeping hidden features near unit scale, initial scores are O(1), so
        # the sigmoid in the preference losses starts unsaturated. A zero bias starts the model
        # without a preferred sign, which matters for the cost model, where the sign means harmful.
        with writable_parameters(self.score_head):
            torch.nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(hidden_size + 1))
            torch.nn.init.zeros_(self.score_head.bias)

    @property
    def sign_convention(self) -> str:
        return SIGN_CONVENTIONS[self.kind]

    @property
    def hidden_size(self) -> int:
        return self.score_head.in_features

    @classmethod
    def from_base(
        cls,
        path: str | Path,
        kind: ScoreKind,
        *,
        freeze_vision_tower: bool = True,
        freeze_projector: bool = False,
        gradient_checkpointing: bool = False,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> ScoreModel:
        """A fresh head of ``kind`` on the base model of the checkpoint at ``path``.

        ``path`` may also be a score model folder: its backbone is reused and its head ignored (use
        :meth:`load` to keep the head, e.g. for critics that start from the reward or cost model).
        """
        backbone = load_model(AutoModel, path, dtype=dtype, trust_remote_code=trust_remote_code)
        model = cls(backbone, kind, base_model=str(path))
        model.prepare_training(
            freeze_vision_tower=freeze_vision_tower,
            freeze_projector=freeze_projector,
            gradient_checkpointing=gradient_checkpointing,
        )
        return model

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        kind: ScoreKind | None = None,
        freeze_vision_tower: bool = True,
        freeze_projector: bool = False,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> ScoreModel:
        """A score model saved by :meth:`save`, head included; ``kind`` re-labels it (a critic
        initialised from a reward model keeps the reward head's weights)."""
        folder = Path(path)
        config = read_score_config(folder)
        backbone = load_model(AutoModel, folder, dtype=dtype, trust_remote_code=trust_remote_code)
        model = cls(backbone, kind or config["kind"], base_model=config.get("base_model", ""))
        if config.get("hidden_size") != model.hidden_size:
            raise ModelFolderError(
                f"{folder / CONFIG_FILE}: hidden_size {config.get('hidden_size')} does not match the "
                f"backbone's {model.hidden_size}"
            )
        head = load_file(folder / HEAD_FILE)
        if set(head) != {"weight", "bias"}:
            raise ModelFolderError(
                f"{folder / HEAD_FILE} must hold 'weight' and 'bias', found {sorted(head)}"
            )
        with torch.no_grad(), writable_parameters(model.score_head):
            model.score_head.weight.copy_(head["weight"])
            model.score_head.bias.copy_(head["bias"])
        model.prepare_training(
            freeze_vision_tower=freeze_vision_tower,
            freeze_projector=freeze_projector,
            gradient_checkpointing=gradient_checkpointing,
        )
        return model

    def prepare_training(
        self, *, freeze_vision_tower: bool, freeze_projector: bool, gradient_checkpointing: bool
    ) -> None:
        """Freeze the image encoder and/or projector and switch on gradient checkpointing.

        Freezing the vision tower leaves the projector trainable even where it sits inside the
        tower (Qwen2-VL's merger), so the two switches mean the same for every family.
        """
        family = family_of(self.backbone.config)
        tower = _find_submodule(self.backbone, family.vision_tower)
        projector = _find_submodule(self.backbone, family.projector)
        for wanted, module, what, names in (
            (freeze_vision_tower, tower, "vision tower", family.vision_tower),
            (freeze_projector, projector, "projector", family.projector),
        ):
            if wanted and module is None:
                raise ValueError(
                    f"cannot freeze the {what}: {type(self.backbone).__name__} has no submodule named "
                    f"any of {names}"
                )
        projector_params = {id(p) for p in projector.parameters()} if projector is not None else set()
        if freeze_vision_tower and tower is not None:
            for param in tower.parameters():
                if id(param) not in projector_params:
                    param.requires_grad_(False)
        if freeze_projector and projector is not None:
            projector.requires_grad_(False)
        if gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen inputs (no requires-grad hook on the
            # embeddings) and is the variant PyTorch recommends.
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute the backbone's activations in backward; same call as on a Hugging Face model, so
        the training engine switches it on for policies and score models alike."""
        self.backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **model_inputs: Any,
    ) -> ScoreOutput:
        """Score every token; ``model_inputs`` carries extra processor outputs (``image_grid_thw``,
        ``image_sizes``, ...) to the backbone."""
        hidden = backbone_hidden(self.backbone, input_ids, attention_mask, pixel_values, **model_inputs)
        scores = self.score_head(hidden).squeeze(-1)
        end_index = last_token_index(attention_mask)
        end_scores = scores.gather(1, end_index.unsqueeze(1)).squeeze(1)
        return ScoreOutput(scores=scores, end_scores=end_scores, end_index=end_index)

    def score_config(self) -> dict[str, Any]:
        """What ``score_config.json`` records: enough to load the head and to read its sign."""
        return {
            "kind": self.kind,
            "sign_convention": self.sign_convention,
            "hidden_size": self.hidden_size,
            "base_model": self.base_model,
            "head": {"bias": self.score_head.bias is not None},
            "format_version": FORMAT_VERSION,
        }

    def save(
        self,
        out_dir: Path,
        *,
        processor: ProcessorMixin | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Write the backbone, head, score config and (when given) the processor into ``out_dir``.

        ``state_dict`` (keys as in ``self.state_dict()``) replaces the module's own weights, for
        DeepSpeed ZeRO-3 callers whose parameters are partitioned and must be gathered first.
        Stages write into a temporary folder they publish atomically, so this writes in place.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        head = {
            key.removeprefix("score_head."): tensor.detach().cpu().contiguous()
            for key, tensor in state.items()
            if key.startswith("score_head.")
        }
        if set(head) != {"weight", "bias"}:
            raise ValueError(
                f"state_dict must hold score_head.weight and score_head.bias, got {sorted(head)}"
            )
        self.backbone.save_pretrained(out_dir, state_dict=backbone_state(state_dict))
        save_file(head, str(out_dir / HEAD_FILE), metadata={"format": "pt"})
        (out_dir / CONFIG_FILE).write_text(json.dumps(self.score_config(), indent=2, sort_keys=True) + "\n")
        if processor is not None:
            processor.save_pretrained(out_dir)
