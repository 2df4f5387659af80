"""The one way this package loads a model or a processor: checked, and from safetensors only.

A pickle checkpoint (`pytorch_model.bin`, `*.pt`) runs code while it loads, so a model folder from
a colleague, a bucket or the hub could take over the training job. Every `from_pretrained` in the
package therefore goes through :func:`load_model` (weights, `use_safetensors=True`) or
:func:`load_processor`, and both check a local folder first, before any data is read or any
training starts: it must exist, hold `config.json`, and hold `*.safetensors` weights. A folder with
only pickle weights is refused by name instead of with transformers' traceback.

A hub id (`owner/name`) is not a local folder; it goes to transformers unchecked, where
`use_safetensors=True` refuses a repository without safetensors weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol, TypeVar

from transformers import AutoProcessor, ProcessorMixin

from safe_rlhf_v.errors import UserError

CONFIG_FILE = "config.json"
SAFETENSORS_GLOB = "*.safetensors"
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

ModelT = TypeVar("ModelT", covariant=True)


class ModelFolderError(UserError, ValueError):
    """A model folder cannot be loaded (no config, no safetensors weights, the wrong kind)."""


class ModelFolderMissing(ModelFolderError, FileNotFoundError):
    """A model folder that does not exist."""


class Pretrained(Protocol[ModelT]):
    """A transformers class that loads with `from_pretrained` (`AutoModel`, `AutoModelFor...`)."""

    def from_pretrained(self, path: str, *args: Any, **kwargs: Any) -> ModelT: ...


def checked_model_source(source: str | Path) -> str:
    """`source` as transformers takes it, once a local folder passed the module's checks.

    Something that does not exist but reads as a hub id (`name` or `owner/name`) is passed on;
    anything else that does not exist (an absolute or deeper path) is a missing folder.
    """
    text = str(source)
    folder = Path(text)
    if not folder.exists():
        if _HUB_ID.match(text) and not text.startswith("."):
            return text
        raise ModelFolderMissing(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelFolderError(f"model {folder} is a file; give the model folder that holds {CONFIG_FILE}")
    if not (folder / CONFIG_FILE).is_file():
        raise ModelFolderError(
            f"model folder {folder} has no {CONFIG_FILE}: it is not a Hugging Face model folder"
        )
    if not any(folder.glob(SAFETENSORS_GLOB)):
        pickles = sorted(p.name for pattern in PICKLE_GLOBS for p in folder.glob(pattern))
        if pickles:
            raise ModelFolderError(
                f"model folder {folder} holds only pickle weights ({', '.join(pickles)}): only "
                "safetensors weights are loaded, since pickle runs code on load; convert them, e.g. "
                "load the model once where you trust it and save_pretrained(..., safe_serialization=True)"
            )
        raise ModelFolderError(f"model folder {folder} holds no weights ({SAFETENSORS_GLOB})")
    return text


def load_model(auto_class: Pretrained[ModelT], source: str | Path, **kwargs: Any) -> ModelT:
    """`auto_class.from_pretrained(source, use_safetensors=True, **kwargs)` after the checks."""
    return auto_class.from_pretrained(checked_model_source(source), use_safetensors=True, **kwargs)


def load_processor(source: str | Path, **kwargs: Any) -> ProcessorMixin:
    """The processor (tokenizer, image processor, chat template) of a checked model folder."""
    return AutoProcessor.from_pretrained(checked_model_source(source), **kwargs)
