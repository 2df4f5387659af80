"""What may be read back from a resume checkpoint: keyed seals, and tensor-only loading.

A checkpoint folder is written by our own processes, but anyone who can write the volume it lives on
could plant a file in it. Two independent locks keep such a file from running code:

* **A keyed seal.** Once every engine and the state file of a step are on disk, rank 0 writes
  `manifest.json`: the sha256 of every file in the folder plus an HMAC-SHA256 of the whole listing
  under a key that lives outside the checkpoint folder. A loader trusts a folder only if the HMAC
  verifies under its own key, the listing names exactly the files present and every digest matches.
  Without the key a forger can rewrite files but cannot re-seal them; an unkeyed manifest (the old
  format) is refused.
* **Tensor-only loading.** DeepSpeed reads its `.pt` files with `torch.load(weights_only=False)`,
  that is, with pickle. `WeightsOnlyCheckpointEngine` replaces that with `weights_only=True`, which
  only rebuilds tensors, containers and the three plain DeepSpeed records allowlisted below (checked
  for ZeRO 0-3, fp32 and bf16, with deepspeed 0.19.8). Even a file swapped after verification
  cannot execute code.

The key: `SAFE_RLHF_V_CHECKPOINT_KEY` (at least 32 characters; in a cluster, from a Kubernetes
Secret), else `<work_dir>/checkpoint.key`, created with mode 0600 on first use and refused when a
link or readable by others. Losing the key only costs the ability to resume: old checkpoints are
then unsealed and training starts afresh.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
import secrets
import stat
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from safe_rlhf_v.errors import UserError
from safe_rlhf_v.work_dir import KEY_FILE

KEY_ENV = "SAFE_RLHF_V_CHECKPOINT_KEY"
MANIFEST = "manifest.json"
MIN_KEY_LENGTH = 32
_FORMAT = 2  # 1 was the unkeyed sha256 listing: refused
_CHUNK = 1 << 20

DEEPSPEED_RECORDS: tuple[type, ...] = (LossScaler, ZeroStageEnum, fragment_address)
"""The non-tensor types inside DeepSpeed's optimizer files: a loss-scale record, the ZeRO stage enum
and the (start, numel) address of a parameter fragment. Plain data, safe to rebuild."""


class CheckpointKeyError(UserError, ValueError):
    """The checkpoint key (the environment variable or the key file) is unusable; names which."""


class CheckpointRejected(UserError, ValueError):
    """A checkpoint folder that must not be loaded; the message says why."""


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with `weights_only=True` (no arbitrary pickle)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        try:
            with torch.serialization.safe_globals(list(DEEPSPEED_RECORDS)):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = [line.strip() for line in str(exc).splitlines()]
            reason = next((line for line in lines if line.startswith("WeightsUnpickler")), lines[0])
            reason = reason.split(" Please use")[0]
            raise CheckpointRejected(
                f"{path} holds more than tensors and plain records, refused ({reason})"
            ) from exc


def checkpoint_key(work_dir: str | Path) -> bytes:
    """The key that seals this work dir's resume checkpoints (see the module docstring)."""
    value = os.environ.get(KEY_ENV)
    if value is not None:
        if len(value) < MIN_KEY_LENGTH:
            raise CheckpointKeyError(
                f"{KEY_ENV} holds {len(value)} characters; a checkpoint key needs at least {MIN_KEY_LENGTH} "
                "(e.g. the output of `openssl rand -hex 32`)"
            )
        return value.encode()
    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / KEY_FILE
    if not os.path.lexists(path):
        _create_key_file(path)
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointKeyError(
            f"checkpoint key {path} is not a regular file (a link?); remove it to create a new key"
        )
    if info.st_mode & 0o077:
        raise CheckpointKeyError(
            f"checkpoint key {path} is accessible to other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"chmod 600 {path}"
        )
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_LENGTH:
        raise CheckpointKeyError(f"checkpoint key {path} holds {len(key)} bytes, fewer than {MIN_KEY_LENGTH}")
    return key


def _create_key_file(path: Path) -> None:
    """Write a fresh key to a private temporary file, then hard-link it into place: processes
    racing on first use all end up reading the one key that won, never a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def ephemeral_key() -> bytes:
    """A key for checkpoints that only this process will ever read back (a one-shot build)."""
    return secrets.token_bytes(MIN_KEY_LENGTH)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB optimizer shards do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to a temporary sibling and rename it, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def _files(folder: Path) -> dict[str, Path]:
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.name != MANIFEST and (p.is_file() or p.is_symlink())
    }


def _mac(key: bytes, body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def seal(folder: Path, key: bytes, **facts: Any) -> None:
    """Make `folder` a checkpoint: list the digest of every file in it with `facts` (step, world
    size, engines) and sign the listing. Rank 0 calls it once every rank finished writing."""
    body = {"format": _FORMAT, **facts, "files": {name: sha256_file(p) for name, p in _files(folder).items()}}
    write_json_atomic(folder / MANIFEST, body | {"hmac": _mac(key, body)})


def read_seal(folder: Path, key: bytes) -> dict[str, Any]:
    """The manifest of `folder` if its HMAC verifies under `key` (files are not hashed: see `verify`)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointRejected(f"{MANIFEST} is missing (the save did not finish)")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        signature = body.pop("hmac", None)
        listed = body["files"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointRejected(f"{MANIFEST} is unreadable ({exc})") from exc
    if body.get("format") != _FORMAT or not isinstance(signature, str):
        raise CheckpointRejected(
            f"{MANIFEST} carries no keyed seal (format {body.get('format')!r}): not trusted"
        )
    if not hmac.compare_digest(signature, _mac(key, body)):
        raise CheckpointRejected(
            f"{MANIFEST} is not sealed with this work dir's checkpoint key (forged or re-keyed)"
        )
    if not isinstance(listed, dict):
        raise CheckpointRejected(f"{MANIFEST} lists no files")
    return body


def verify(folder: Path, key: bytes) -> dict[str, Any]:
    """The manifest of `folder` once the seal verifies and every file present is listed with its digest."""
    body = read_seal(folder, key)
    listed: dict[str, str] = body["files"]
    present = _files(folder)
    if extra := sorted(set(present) - set(listed)):
        raise CheckpointRejected(f"files not in the manifest: {', '.join(extra)}")
    if missing := sorted(set(listed) - set(present)):
        raise CheckpointRejected(f"files listed in the manifest are missing: {', '.join(missing)}")
    for name, path in present.items():
        if path.is_symlink():
            raise CheckpointRejected(f"{name} is a symbolic link")
        if sha256_file(path) != listed[name]:
            raise CheckpointRejected(
                f"{name} does not match its sha256 in the manifest (changed or corrupted)"
            )
    return body
