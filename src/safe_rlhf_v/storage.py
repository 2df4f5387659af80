"""One storage API for local paths and ``s3://`` URIs.

Every stage reads its inputs and writes its outputs through this module, so the same code runs on
one machine (local folders, ``file://`` URIs) and in a cluster (S3 or MinIO). The rules:

* Local writes are atomic: a file or folder appears at its final path only once it is complete,
  so a failed stage never leaves a half-written artifact that a later stage could take for good.
* A folder artifact is "every file under a folder / key prefix". Uploading a folder makes the
  prefix hold exactly that folder's files (stale keys from an earlier upload are deleted after the
  new ones are in place); downloading replaces the local folder as a whole. Empty folders are not
  represented, as S3 has none.
* When a URI names both an object ``k`` and objects under ``k/``, the object wins.
* Hashing an S3 folder records each object's sha256 with its ETag and size under
  ``.safe-rlhf-v/digests/`` in the same bucket; the next hash of that folder (another stage, another
  pod) streams only the objects whose ETag or size changed. A 7B checkpoint is hashed by several
  stages for lineage, so this saves re-reading tens of GB per pipeline run. The records are a cache:
  an object rewritten with other content gets a new ETag, and deleting them costs one re-hash.
* Every failure raises :class:`StorageError` naming the URI (and, for S3, the endpoint, with any
  credentials in it masked); malformed URIs raise its subclass :class:`MalformedURI`, also a
  ``ValueError``.

S3 access goes through boto3 with credentials from the standard AWS chain (environment, shared
files, IAM roles); they are never logged. Tunables, read from the environment on every call:
``SAFE_RLHF_V_S3_MAX_ATTEMPTS`` (default 5), ``SAFE_RLHF_V_S3_CONNECT_TIMEOUT`` (seconds, default 5),
``SAFE_RLHF_V_S3_READ_TIMEOUT`` (seconds to wait for each response or chunk once connected, default
15: an endpoint that accepts connections but never answers fails after attempts x timeout instead
of botocore's 60 s per attempt) and ``SAFE_RLHF_V_S3_MULTIPART_MB`` (multipart threshold and part
size in MiB, default 64, at least S3's 5 MiB part minimum). botocore's own variables (for example
``AWS_REQUEST_CHECKSUM_CALCULATION`` for stores without the newer checksums) apply as usual.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from safe_rlhf_v.errors import UserError, redact

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
DIGEST_RECORD_PREFIX = ".safe-rlhf-v/digests/"
"""Where, in a folder's own bucket, the per-object digests of hashed S3 folders are recorded."""
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
MAX_ATTEMPTS_ENV = "SAFE_RLHF_V_S3_MAX_ATTEMPTS"
CONNECT_TIMEOUT_ENV = "SAFE_RLHF_V_S3_CONNECT_TIMEOUT"
READ_TIMEOUT_ENV = "SAFE_RLHF_V_S3_READ_TIMEOUT"
MULTIPART_MB_ENV = "SAFE_RLHF_V_S3_MULTIPART_MB"
CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)

_MIB = 1024 * 1024
_MIN_PART_MIB = 5  # S3 rejects multipart parts (other than the last) below 5 MiB
_CHUNK = _MIB
_DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per request
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}
)


class StorageError(UserError, RuntimeError):
    """A storage operation failed; the message names the URI and, for S3, the endpoint."""


class MalformedURI(StorageError, ValueError):
    """A URI this module cannot address (no bucket, an unsupported scheme, a remote file host)."""


# --------------------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    """Whether ``uri`` addresses S3 (anything else is a local path or ``file://`` URI)."""
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``("bucket", "key")``; the key may be empty (bucket root)."""
    if not is_s3(uri):
        raise MalformedURI(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise MalformedURI(f"malformed S3 URI {uri!r}: no bucket name (expected s3://bucket/key)")
    return bucket, key


def _local_path(uri: str) -> Path:
    """Map a local path or ``file://`` URI to a Path; refuse other schemes rather than make a folder
    literally named ``gs:``."""
    if uri.startswith(FILE_SCHEME):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise MalformedURI(f"file URI {uri!r} names a remote host; only local files are supported")
        return Path(unquote(parsed.path))
    if _SCHEME_RE.match(uri):
        raise MalformedURI(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return Path(uri)


def _prefix_of(key: str) -> str:
    """The key prefix that holds a folder's objects: ``"a/b"`` and ``"a/b/"`` both give ``"a/b/"``;
    the bucket root gives ``""``."""
    stripped = key.strip("/")
    return f"{stripped}/" if stripped else ""


# -------------------------------------------------------------------------------- S3 client


def _env_number(name: str, default: float, minimum: float, kind: type[int] | type[float]) -> int | float:
    """Read a numeric tunable, failing loudly on a typo instead of silently using the default."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise StorageError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None
    if value < minimum:
        raise StorageError(f"environment variable {name}={raw!r} must be at least {minimum}")
    return value


def _configured_endpoint() -> tuple[str | None, str | None]:
    """The endpoint URL and the variable it came from (MinIO / moto / S3-compatible stores)."""
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return value, name
    return None, None


def s3_client() -> BaseClient:
    """A boto3 S3 client configured from the environment.

    A fresh ``boto3.session.Session`` is used on every call because the default session caches
    credentials for the life of the process, which would hide rotated or corrected credentials.
    With a custom endpoint, path-style addressing is used since MinIO and most S3-compatible
    stores do not serve virtual-host bucket names. ``SAFE_RLHF_V_S3_MAX_ATTEMPTS`` counts the first
    try too, like ``AWS_MAX_ATTEMPTS`` (botocore's ``max_attempts`` key would count retries only).
    """
    endpoint, _ = _configured_endpoint()
    config = Config(
        retries={"mode": "standard", "total_max_attempts": int(_env_number(MAX_ATTEMPTS_ENV, 5, 1, int))},
        connect_timeout=_env_number(CONNECT_TIMEOUT_ENV, 5.0, 0.1, float),
        read_timeout=_env_number(READ_TIMEOUT_ENV, 15.0, 0.1, float),
        s3={"addressing_style": "path"} if endpoint else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _transfer_config() -> TransferConfig:
    """Managed-transfer settings: files above the threshold go multipart, in parts of that size."""
    size = int(_env_number(MULTIPART_MB_ENV, 64, _MIN_PART_MIB, int)) * _MIB
    return TransferConfig(multipart_threshold=size, multipart_chunksize=size)


# ------------------------------------------------------------------------------- S3 errors


def _endpoint_text(client: BaseClient) -> str:
    """The URL a client talks to and where it came from, for error messages (credentials masked)."""
    _, source = _configured_endpoint()
    origin = f"set by {source}" if source else "the AWS default"
    return f"{redact(client.meta.endpoint_url)}, {origin}"


def _credentials_hint() -> str:
    """Name (never print) the credential variables in play so the user knows what to fix."""
    present = [name for name in CREDENTIAL_ENV_VARS if os.environ.get(name)]
    return (
        "credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY "
        "[+ AWS_SESSION_TOKEN], AWS_PROFILE / AWS_SHARED_CREDENTIALS_FILE, or an IAM role); "
        f"set in this environment: {', '.join(present) or 'none of these variables'}"
    )


def _client_error_root(err: BaseException) -> BaseException:
    """boto3's transfer manager wraps ClientError (S3UploadFailedError, RetriesExceededError);
    dig out the botocore error so it maps to the same message as a direct call."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ClientError | BotoCoreError):
            return current
        seen.add(id(current))
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__
    return err


def _translate(err: BaseException, client: BaseClient, uri: str) -> StorageError:
    """Turn a boto error into a StorageError whose message says what to fix."""
    root = _client_error_root(err)
    endpoint = _endpoint_text(client)
    if isinstance(root, ClientError):
        error = root.response.get("Error", {})
        code = str(error.get("Code", ""))
        detail = f"{code} {error.get('Message', '')}".strip()
        if code == "NoSuchBucket":
            bucket = split_s3(uri)[0]
            return StorageError(
                f"S3 bucket '{bucket}' does not exist (endpoint {endpoint}); needed for {uri}"
            )
        if code in _MISSING_KEY_CODES:
            return StorageError(f"no object or prefix at {uri} (endpoint {endpoint})")
        if code in _CREDENTIAL_CODES:
            return StorageError(
                f"S3 rejected the credentials or denied access for {uri} (endpoint {endpoint}): "
                f"{detail}; {_credentials_hint()}"
            )
        return StorageError(f"S3 request for {uri} failed (endpoint {endpoint}): {detail}")
    if isinstance(root, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"no usable S3 credentials for {uri} (endpoint {endpoint}): {_credentials_hint()}"
        )
    if isinstance(root, ReadTimeoutError):
        return StorageError(
            f"S3 endpoint {endpoint} timed out: no answer for {uri} within "
            f"{client.meta.config.read_timeout} s; check that the endpoint is an S3 server and is "
            f"not overloaded, or raise {READ_TIMEOUT_ENV}"
        )
    if isinstance(root, BotoConnectionError):
        return StorageError(
            f"cannot reach S3 endpoint {endpoint} (needed for {uri}): {redact(str(root))}; check the "
            f"endpoint variable ({', '.join(ENDPOINT_ENV_VARS)}) and that the server is up"
        )
    return StorageError(f"S3 operation on {uri} failed (endpoint {endpoint}): {root}")


@contextmanager
def _s3_errors(client: BaseClient, uri: str) -> Iterator[None]:
    """Must sit inside any ``_os_errors``: some botocore errors also subclass OSError."""
    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as err:
        raise _translate(err, client, uri) from err


@contextmanager
def _os_errors(action: str) -> Iterator[None]:
    """Local I/O failures (missing file, permission, full disk) as StorageError naming the path."""
    try:
        yield
    except OSError as err:
        raise StorageError(f"{action} failed: {err}") from err


# ------------------------------------------------------------------------------ S3 listing


def _is_object(client: BaseClient, bucket: str, key: str) -> bool:
    """Whether ``key`` is one object. A missing bucket also answers 404 to HEAD, so callers list
    the prefix next, which names the missing bucket precisely."""
    if not key or key.endswith("/"):
        return False
    try:
        client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code")) in _MISSING_KEY_CODES:
            return False
        raise
    return True


def _list_keys(client: BaseClient, bucket: str, prefix: str) -> list[str]:
    paginator = client.get_paginator("list_objects_v2")
    return [
        item["Key"]
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
    ]


def _checked_relative(relative: str, key: str, uri: str) -> str:
    """Refuse keys that would land outside the target folder (``..``) or collide (``a//b``)."""
    if any(part in ("", ".", "..") for part in relative.split("/")):
        raise StorageError(f"S3 key {key!r} under {uri} does not map to a file inside a folder")
    return relative


def _prefix_files(client: BaseClient, uri: str) -> list[tuple[str, str]]:
    """Sorted ``(relative path, key)`` of every object under the folder prefix of ``uri``;
    zero-byte "folder marker" keys ending in ``/`` are not files and are skipped."""
    bucket, key = split_s3(uri)
    prefix = _prefix_of(key)
    files = [
        (_checked_relative(found[len(prefix) :], found, uri), found)
        for found in _list_keys(client, bucket, prefix)
        if not found.endswith("/")
    ]
    return sorted(files)


def _missing(client: BaseClient, uri: str) -> StorageError:
    return StorageError(f"no object or prefix at {uri} (endpoint {_endpoint_text(client)})")


# ---------------------------------------------------------------------------------- digests


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in 1 MiB chunks so multi-GB shards never sit in memory."""
    digest = hashlib.sha256()
    with _os_errors(f"hashing {path}"), open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_digest(entries: Iterable[tuple[str, str]]) -> str:
    """One digest for a folder: sha256 of ``"<file sha256>  <relative path>\\n"`` lines in path
    order, i.e. of what ``sha256sum`` prints, so it can be recomputed with standard tools and the
    same folder gives the same digest locally and under an S3 prefix."""
    manifest = hashlib.sha256()
    for relative, file_digest in sorted(entries):
        manifest.update(f"{file_digest}  {relative}\n".encode())
    return manifest.hexdigest()


def _local_files(root: Path) -> list[str]:
    """Sorted POSIX-style relative paths of the files under ``root`` (what S3 would hold)."""
    found = [
        (Path(directory) / name).relative_to(root).as_posix()
        for directory, _, names in os.walk(root)
        for name in names
        if (Path(directory) / name).is_file()
    ]
    return sorted(found)


def sha256_dir(path: Path) -> str:
    """Content digest of a folder artifact over its sorted relative paths and file digests."""
    if not path.is_dir():
        raise StorageError(f"cannot hash folder {path}: not a directory")
    return _tree_digest((relative, sha256_file(path / relative)) for relative in _local_files(path))


def _sha256_object(client: BaseClient, bucket: str, key: str) -> str:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    for chunk in body.iter_chunks(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _listing(client: BaseClient, uri: str) -> dict[str, tuple[str, int, str]]:
    """``relative path -> (key, size, ETag)`` of every file under the folder prefix of ``uri``."""
    bucket, key = split_s3(uri)
    prefix = _prefix_of(key)
    paginator = client.get_paginator("list_objects_v2")
    return {
        _checked_relative(item["Key"][len(prefix) :], item["Key"], uri): (
            item["Key"],
            int(item["Size"]),
            str(item["ETag"]),
        )
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    }


def _record_key(uri: str) -> str:
    return f"{DIGEST_RECORD_PREFIX}{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()}.json"


def _read_record(client: BaseClient, bucket: str, uri: str) -> dict[str, Any]:
    """The recorded ``relative path -> {etag, size, sha256}`` of ``uri``; empty when there is none
    or it is unreadable (a cache miss, never an error)."""
    try:
        record = json.loads(client.get_object(Bucket=bucket, Key=_record_key(uri))["Body"].read())
    except ClientError as err:
        if str(err.response.get("Error", {}).get("Code")) not in _MISSING_KEY_CODES:
            log.warning("digest record of %s unreadable (%s); hashing every object", uri, err)
        return {}
    except ValueError:
        log.warning("digest record of %s is not valid JSON; hashing every object", uri)
        return {}
    files = record.get("files") if isinstance(record, dict) and record.get("uri") == uri.rstrip("/") else None
    return files if isinstance(files, dict) else {}


def _write_record(client: BaseClient, bucket: str, uri: str, files: dict[str, Any]) -> None:
    """Record the per-object digests; a bucket we may not write to only costs the next re-hash."""
    body = json.dumps({"uri": uri.rstrip("/"), "files": files}, sort_keys=True).encode()
    try:
        client.put_object(Bucket=bucket, Key=_record_key(uri), Body=body)
    except (ClientError, BotoCoreError) as err:
        log.warning("could not record the digests of %s (%s); the next hash streams it again", uri, err)


def _prefix_digest(client: BaseClient, uri: str) -> str:
    """:func:`sha256_dir`'s digest of an S3 folder, streaming only objects the record lacks."""
    bucket, _ = split_s3(uri)
    listing = _listing(client, uri)
    if not listing:
        raise _missing(client, uri)
    known = _read_record(client, bucket, uri)
    files: dict[str, Any] = {}
    for relative, (key, size, etag) in sorted(listing.items()):
        entry = known.get(relative)
        fresh = isinstance(entry, dict) and entry.get("etag") == etag and entry.get("size") == size
        digest = entry["sha256"] if fresh and isinstance(entry.get("sha256"), str) else None
        files[relative] = {
            "etag": etag,
            "size": size,
            "sha256": digest or _sha256_object(client, bucket, key),
        }
    if files != known:
        _write_record(client, bucket, uri, files)
    return _tree_digest((relative, entry["sha256"]) for relative, entry in files.items())


def sha256_uri(uri: str) -> str:
    """Digest of a file or folder, local or on S3.

    S3 objects are streamed through the hash rather than downloaded, so hashing a checkpoint needs
    no scratch disk; a folder prefix gets the same digest :func:`sha256_dir` gives its download.
    Objects hashed before with the same ETag and size are not read again (module docstring).
    """
    if not is_s3(uri):
        path = _local_path(uri)
        if path.is_dir():
            return sha256_dir(path)
        if path.is_file():
            return sha256_file(path)
        raise StorageError(f"no file or folder at {uri}")
    bucket, key = split_s3(uri)
    client = s3_client()
    with _s3_errors(client, uri):
        if _is_object(client, bucket, key):
            return _sha256_object(client, bucket, key)
        return _prefix_digest(client, uri)


# ------------------------------------------------------------------------- atomic local I/O


def _sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name beside ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{tag}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _move_into_place(new: Path, dest: Path) -> None:
    """Replace ``dest`` by ``new``. POSIX cannot rename a folder over a non-empty one, so the old
    one is renamed aside first and restored if the second rename fails."""
    if not dest.exists() and not dest.is_symlink():
        os.rename(new, dest)
        return
    old = _sibling(dest, "old")
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``dest``; on success it replaces ``dest``.

    On an exception the temporary folder is removed, any existing ``dest`` is left untouched and
    the exception propagates. The folder is created with the process umask (not mkdtemp's 0700)
    so other pods sharing the volume can read the artifact.
    """
    with _os_errors(f"preparing folder {dest}"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(dest, "tmp")
        tmp.mkdir()
    try:
        yield tmp
        with _os_errors(f"moving finished folder into {dest}"):
            _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to fill; ``os.replace`` publishes it on success."""
    with _os_errors(f"preparing {path}"):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        with _os_errors(f"moving finished file into {path}"):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so readers see the old content or the new, never a partial file; fsync'd
    before the rename so a crash cannot publish an empty file."""
    with _atomic_file(path) as tmp, _os_errors(f"writing {path}"), open(tmp, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _copy_local(src: Path, dst: Path) -> None:
    """Copy a file or folder atomically (a folder replaces ``dst`` as a whole)."""
    if src.is_dir():
        with atomic_dir(dst) as tmp, _os_errors(f"copying {src} to {dst}"):
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    elif src.is_file():
        with _atomic_file(dst) as tmp, _os_errors(f"copying {src} to {dst}"):
            shutil.copyfile(src, tmp)
    else:
        raise StorageError(f"no file or folder at {src}")


# -------------------------------------------------------------------------- read and write


def _object_key(uri: str, action: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(f"cannot {action} {uri}: the URI names a bucket or prefix, not an object key")
    return bucket, key


def read_bytes(uri: str) -> bytes:
    """Whole content of one file or object (meant for configs, manifests and metrics)."""
    if not is_s3(uri):
        with _os_errors(f"reading {uri}"):
            return _local_path(uri).read_bytes()
    bucket, key = _object_key(uri, "read")
    client = s3_client()
    with _s3_errors(client, uri):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_text(uri: str) -> str:
    """UTF-8 text of one file or object."""
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StorageError(f"{uri} is not UTF-8 text: {err}") from err


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file (atomically) or object (a single PUT, which S3 makes visible all at once)."""
    if not is_s3(uri):
        atomic_write_bytes(_local_path(uri), data)
        return
    bucket, key = _object_key(uri, "write")
    client = s3_client()
    with _s3_errors(client, uri):
        client.put_object(Bucket=bucket, Key=key, Body=data)


def write_text(uri: str, text: str) -> None:
    """UTF-8 text version of :func:`write_bytes`."""
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    """Whether ``uri`` is a file/object or a folder/prefix holding at least one file.

    A missing bucket or an unreachable endpoint raises instead of answering False: those are
    configuration errors that a "not there yet" answer would hide.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        return path.is_file() or (path.is_dir() and bool(_local_files(path)))
    bucket, key = split_s3(uri)
    client = s3_client()
    with _s3_errors(client, uri):
        return _is_object(client, bucket, key) or bool(_prefix_files(client, uri))


def list_files(uri: str) -> list[str]:
    """Sorted POSIX relative paths of all files under a folder or prefix."""
    if not is_s3(uri):
        path = _local_path(uri)
        if path.is_dir():
            return _local_files(path)
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise StorageError(f"cannot list {uri}: it {problem}")
    bucket, key = split_s3(uri)
    client = s3_client()
    with _s3_errors(client, uri):
        files = _prefix_files(client, uri)
        if files:
            return [relative for relative, _ in files]
        if _is_object(client, bucket, key):
            raise StorageError(f"cannot list {uri}: it is an object, not a prefix")
        raise _missing(client, uri)


def probe_write(uri: str) -> None:
    """Check that a folder or prefix can be written to, by writing and deleting one small file.

    A stage calls this before its work starts, so an unwritable or unreachable output location
    fails in seconds instead of after hours of training. A local folder is probed in its parent,
    where the atomic publish puts its temporary sibling.
    """
    probe_name = f".safe-rlhf-v-probe-{uuid.uuid4().hex[:12]}"
    if not is_s3(uri):
        parent = _local_path(uri).absolute().parent
        with _os_errors(f"writing to {parent}"):
            parent.mkdir(parents=True, exist_ok=True)
            (parent / probe_name).write_bytes(b"")
            (parent / probe_name).unlink()
        return
    bucket, key = split_s3(uri)
    probe = f"{_prefix_of(key)}{probe_name}"
    client = s3_client()
    with _s3_errors(client, uri):
        client.put_object(Bucket=bucket, Key=probe, Body=b"")
        client.delete_object(Bucket=bucket, Key=probe)


# ------------------------------------------------------------------------ transfers


def _delete_keys(client: BaseClient, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), _DELETE_BATCH):
        batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
        response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if response.get("Errors"):
            first = response["Errors"][0]
            raise StorageError(
                f"could not delete stale key s3://{bucket}/{first.get('Key')}: "
                f"{first.get('Code')} {first.get('Message')}"
            )


def _upload_folder(client: BaseClient, local: Path, uri: str, config: TransferConfig) -> None:
    bucket, key = split_s3(uri)
    prefix = _prefix_of(key)
    if not prefix:
        raise StorageError(
            f"refusing to upload folder {local} to the bucket root {uri}: give a key prefix, since the "
            "upload replaces everything under it"
        )
    files = _local_files(local)
    if not files:
        raise StorageError(f"nothing to upload: folder {local} holds no files")
    for relative in files:
        client.upload_file(str(local / relative), bucket, prefix + relative, Config=config)
    wanted = {prefix + relative for relative in files}
    _delete_keys(
        client, bucket, [found for found in _list_keys(client, bucket, prefix) if found not in wanted]
    )


def upload(local: Path, uri: str) -> None:
    """Publish a local file as an object, or a folder as a prefix that then holds exactly its files.

    Transfers use boto3's managed transfer, so files above ``SAFE_RLHF_V_S3_MULTIPART_MB`` go up in
    parallel multipart parts. A local destination is a plain atomic copy, so stages can call this
    whatever their output location is.
    """
    if not is_s3(uri):
        _copy_local(local, _local_path(uri))
        return
    if not local.exists():
        raise StorageError(f"cannot upload {local} to {uri}: no such file or folder")
    client = s3_client()
    config = _transfer_config()
    with _os_errors(f"uploading {local} to {uri}"), _s3_errors(client, uri):
        if local.is_dir():
            _upload_folder(client, local, uri, config)
        else:
            bucket, key = _object_key(uri, f"upload file {local} to")
            client.upload_file(str(local), bucket, key, Config=config)


def _download_s3(client: BaseClient, uri: str, local: Path) -> None:
    bucket, key = split_s3(uri)
    config = _transfer_config()
    if _is_object(client, bucket, key):
        with _atomic_file(local) as tmp:
            client.download_file(bucket, key, str(tmp), Config=config)
        return
    files = _prefix_files(client, uri)
    if not files:
        raise _missing(client, uri)
    with atomic_dir(local) as tmp:
        for relative, found in files:
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, found, str(target), Config=config)


def download(uri: str, local: Path) -> Path:
    """Fetch an object to a file or a prefix to a folder (replacing ``local``), atomically: a
    failed download leaves nothing new at ``local``. A local ``uri`` is copied. Returns ``local``."""
    if not is_s3(uri):
        _copy_local(_local_path(uri), local)
        return local
    client = s3_client()
    with _os_errors(f"downloading {uri} to {local}"), _s3_errors(client, uri):
        _download_s3(client, uri, local)
    return local


def copy(src_uri: str, dst_uri: str) -> None:
    """Copy a file or folder between any two locations, local or S3.

    S3 to S3 goes through a local temporary copy rather than a server-side copy, so files and
    folders, multipart and stale-key cleanup all follow the one upload/download path.
    """
    if is_s3(src_uri) and is_s3(dst_uri):
        with tempfile.TemporaryDirectory(prefix="safe-rlhf-v-copy-") as scratch:
            upload(download(src_uri, Path(scratch) / "item"), dst_uri)
    elif is_s3(src_uri):
        download(src_uri, _local_path(dst_uri))
    else:
        upload(_local_path(src_uri), dst_uri)
