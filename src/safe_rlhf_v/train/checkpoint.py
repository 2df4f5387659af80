"""Integrity layer around DeepSpeed checkpoints: tags, sha256 manifests, pruning and RNG state as JSON.

DeepSpeed stores model, optimizer and scheduler state with `torch.save` and reads it back with
`torch.load(weights_only=False)`, that is, with pickle: loading a tampered file runs code. ZeRO's
partitioned optimizer state has no safetensors form, so instead of replacing the format we make
sure only files we wrote get loaded. Once every rank finished saving, rank 0 writes
`manifest.json` (the sha256 of every file of the tag folder) and only then is the checkpoint
complete; a loader trusts a folder only if the manifest lists exactly the files present and every
digest matches. A save cut short by a killed pod leaves no manifest and is skipped.

Our own state never goes through pickle: the caller's `client_state` and each rank's RNG state are
JSON files inside the tag folder, covered by the same manifest.

Layout under a checkpoint root (one root per trained model)::

    root/step-<N>/manifest.json, client_state.json, rng-rank<R>.json, DeepSpeed's *.pt files
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "manifest.json"
CLIENT_STATE = "client_state.json"
_TAG = re.compile(r"^step-(\d+)$")
_CHUNK = 1 << 20


def tag_for(step: int) -> str:
    """The folder name of the checkpoint taken after optimizer step `step`."""
    return f"step-{step}"


def rng_file(rank: int) -> str:
    """Each rank has its own generators (dropout masks differ per rank), hence one file per rank."""
    return f"rng-rank{rank:05d}.json"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`(step, folder)` of every `step-N` folder directly under `root`, newest first.

    Symbolic links are left out: a checkpoint is only ever read from inside the given root.
    """
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), entry)
        for entry in root.iterdir()
        if (match := _TAG.match(entry.name)) and entry.is_dir() and not entry.is_symlink()
    ]
    return sorted(found, key=lambda item: item[0], reverse=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB optimizer shards do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name != MANIFEST and (p.is_file() or p.is_symlink()))


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary sibling and rename it, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def write_manifest(folder: Path, *, step: int, world_size: int) -> None:
    """Seal a finished checkpoint: record the digest of every file it holds (rank 0, after all saved)."""
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in _files(folder)}
    write_json_atomic(
        folder / MANIFEST, {"format": 1, "global_step": step, "world_size": world_size, "files": files}
    )


def manifest_problem(folder: Path) -> str | None:
    """Why `folder` must not be loaded, or None when its manifest vouches for every file in it."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path.name} is missing (the save did not finish)"
    try:
        listed = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path.name} is unreadable ({exc})"
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    if extra := sorted(set(present) - set(listed)):
        return f"files not in the manifest: {', '.join(extra)}"
    if missing := sorted(set(listed) - set(present)):
        return f"files listed in the manifest are missing: {', '.join(missing)}"
    for name, path in present.items():
        if path.is_symlink():
            return f"{name} is a symbolic link"
        if sha256_file(path) != listed[name]:
            return f"{name} does not match its sha256 in the manifest (changed or corrupted)"
    return None


def newest_valid(root: Path, logger: logging.Logger, *, step: int | None = None) -> tuple[int, Path] | None:
    """The newest checkpoint under `root` (or exactly `step`) that passes `manifest_problem`.

    Warns about each one skipped.
    """
    for found, folder in step_dirs(root):
        if step is not None and found != step:
            continue
        problem = manifest_problem(folder)
        if problem is None:
            return found, folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def prune(root: Path, *, current_step: int, keep: int) -> list[Path]:
    """Delete checkpoints that can no longer be wanted; returns what was removed.

    Kept: the newest `keep` complete checkpoints at or before `current_step`. Removed: older
    complete ones, incomplete ones, and any step beyond `current_step`, which belongs to an
    abandoned timeline (a run that resumed from an earlier step and has now re-saved).
    """
    removed: list[Path] = []
    kept = 0
    for step, folder in step_dirs(root):
        complete = (folder / MANIFEST).is_file()
        if step <= current_step and complete and kept < keep:
            kept += 1
            continue
        shutil.rmtree(folder)
        removed.append(folder)
    return removed


def rng_state() -> dict[str, Any]:
    """The state of every random generator training draws from, as JSON-able lists."""
    version, mt_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`. CUDA states are restored only where CUDA exists (same hardware resume)."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
