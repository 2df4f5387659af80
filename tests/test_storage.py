"""Tests for safe_rlhf_v.storage: local paths and s3:// against moto's S3 server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from safe_rlhf_v import storage
from safe_rlhf_v.storage import StorageError

MIB = 1024 * 1024


def _make_tree(root: Path) -> dict[str, bytes]:
    """A small folder artifact with nested files; returns relative path -> content."""
    files = {
        "config.json": b'{"hidden_size": 8}',
        "model.safetensors": bytes(range(256)) * 40,
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "tokenizer/special/extra tokens.json": b"[]",
    }
    for relative, data in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return files


def _leftovers(parent: Path) -> list[str]:
    """Hidden temporary siblings that an atomic operation must not leave behind."""
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def _boto(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint)


# ------------------------------------------------------------------------------ URI parsing


def test_split_s3_gives_bucket_and_key() -> None:
    assert storage.split_s3("s3://models/reward/v1") == ("models", "reward/v1")
    assert storage.split_s3("s3://models") == ("models", "")
    assert storage.is_s3("s3://models/x")
    assert not storage.is_s3("/data/models")


@pytest.mark.parametrize("uri", ["s3://", "s3:///key", "/local/path"])
def test_split_s3_rejects_malformed_uri_naming_it(uri: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(uri))):
        storage.split_s3(uri)


def test_unsupported_scheme_is_rejected_not_treated_as_a_folder() -> None:
    with pytest.raises(ValueError, match=r"unsupported URI scheme in 'gs://bucket/x'"):
        storage.write_text("gs://bucket/x", "hello")


# -------------------------------------------------------------------------------- digests


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = b"0123456789" * 300_000  # 3 MB: several read chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert storage.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_sha256_dir_is_sha256sum_manifest_of_sorted_files(tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "art")
    lines = "".join(
        f"{hashlib.sha256(files[relative]).hexdigest()}  {relative}\n" for relative in sorted(files)
    )
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert storage.sha256_dir(tmp_path / "art") == expected
    assert storage.sha256_uri(str(tmp_path / "art")) == expected


def test_sha256_dir_depends_on_paths_as_well_as_content(tmp_path: Path) -> None:
    _make_tree(tmp_path / "art")
    before = storage.sha256_dir(tmp_path / "art")
    (tmp_path / "art" / "config.json").rename(tmp_path / "art" / "config2.json")
    assert storage.sha256_dir(tmp_path / "art") != before


def test_sha256_uri_of_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"no file or folder at .*nothing-here"):
        storage.sha256_uri(str(tmp_path / "nothing-here"))


# ----------------------------------------------------------------------------- atomic local I/O


def test_atomic_dir_replaces_existing_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    with storage.atomic_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        (tmp / "new.txt").write_text("new")
        assert (dest / "stale.txt").exists()  # nothing visible until success
    assert storage.list_files(str(dest)) == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failure_keeps_old_dest_and_removes_temp(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "good.txt").write_text("good")
    with pytest.raises(RuntimeError, match="stage crashed"), storage.atomic_dir(dest) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("stage crashed")
    assert storage.list_files(str(dest)) == ["good.txt"]
    assert (dest / "good.txt").read_text() == "good"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_failure_without_dest_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyError), storage.atomic_dir(tmp_path / "new" / "out"):
        raise KeyError("boom")
    assert not (tmp_path / "new" / "out").exists()
    assert _leftovers(tmp_path / "new") == []


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.json"
    storage.atomic_write_text(path, "first")
    storage.atomic_write_bytes(path, b"second")
    assert path.read_bytes() == b"second"
    assert _leftovers(path.parent) == []


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        storage.atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------------------------- local URIs


def test_local_round_trip_exists_list_and_copy(tmp_path: Path) -> None:
    storage.write_text(str(tmp_path / "a" / "note.txt"), "héllo")
    assert storage.read_text(f"file://{tmp_path}/a/note.txt") == "héllo"
    assert storage.exists(str(tmp_path / "a")) and storage.exists(str(tmp_path / "a" / "note.txt"))
    (tmp_path / "empty").mkdir()
    assert not storage.exists(str(tmp_path / "empty"))
    assert not storage.exists(str(tmp_path / "missing"))

    files = _make_tree(tmp_path / "art")
    storage.copy(str(tmp_path / "art"), str(tmp_path / "copy"))
    assert storage.list_files(str(tmp_path / "copy")) == sorted(files)
    assert storage.sha256_dir(tmp_path / "copy") == storage.sha256_dir(tmp_path / "art")


def test_local_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"reading .*absent\.txt failed"):
        storage.read_bytes(str(tmp_path / "absent.txt"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(StorageError, match=r"f\.txt: it is a file, not a folder"):
        storage.list_files(str(tmp_path / "f.txt"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(StorageError, match=r"latin1\.txt is not UTF-8 text"):
        storage.read_text(str(tmp_path / "latin1.txt"))


# ------------------------------------------------------------------------------ S3 client


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"AWS_ENDPOINT_URL_S3": "http://s3.one:9000", "AWS_ENDPOINT_URL": "http://two:1"},
            "http://s3.one:9000",
        ),
        (
            {"AWS_ENDPOINT_URL": "http://two:9000", "MLFLOW_S3_ENDPOINT_URL": "http://three:1"},
            "http://two:9000",
        ),
        ({"MLFLOW_S3_ENDPOINT_URL": "http://three:9000"}, "http://three:9000"),
    ],
)
def test_s3_client_endpoint_precedence_and_settings(
    env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in storage.ENDPOINT_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "3")
    client = storage.s3_client()
    assert client.meta.endpoint_url == expected
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert client.meta.config.s3 == {"addressing_style": "path"}
    assert client.meta.config.connect_timeout == 5.0


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        (storage.MAX_ATTEMPTS_ENV, "many", "is not a valid int"),
        (storage.MAX_ATTEMPTS_ENV, "0", "must be at least 1"),
        (storage.MULTIPART_MB_ENV, "1", "must be at least 5"),
    ],
)
def test_bad_tuning_variable_is_named(
    name: str, value: str, problem: str, tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StorageError, match=f"{name}='{value}' {problem}"):
        storage.upload(tmp_path / "f", f"s3://{s3_bucket}/f")


# ------------------------------------------------------------------------------ S3 round trips


def test_s3_bytes_and_text_round_trip(s3_bucket: str) -> None:
    storage.write_bytes(f"s3://{s3_bucket}/raw/blob.bin", b"\x00\x01binary")
    storage.write_text(f"s3://{s3_bucket}/raw/note.txt", "naïve ☂")
    assert storage.read_bytes(f"s3://{s3_bucket}/raw/blob.bin") == b"\x00\x01binary"
    assert storage.read_text(f"s3://{s3_bucket}/raw/note.txt") == "naïve ☂"
    assert storage.exists(f"s3://{s3_bucket}/raw/note.txt")
    assert storage.exists(f"s3://{s3_bucket}/raw")  # a prefix
    assert not storage.exists(f"s3://{s3_bucket}/ra")  # not a folder prefix of raw/
    assert not storage.exists(f"s3://{s3_bucket}/raw/missing.txt")
    assert storage.list_files(f"s3://{s3_bucket}/raw/") == ["blob.bin", "note.txt"]
    assert (
        storage.sha256_uri(f"s3://{s3_bucket}/raw/blob.bin") == hashlib.sha256(b"\x00\x01binary").hexdigest()
    )


def test_folder_upload_download_keeps_tree_and_digest(tmp_path: Path, s3_bucket: str) -> None:
    files = _make_tree(tmp_path / "art")
    digest = storage.sha256_dir(tmp_path / "art")
    uri = f"s3://{s3_bucket}/runs/1/reward"
    storage.upload(tmp_path / "art", uri)
    assert storage.list_files(uri) == sorted(files)
    assert storage.sha256_uri(uri) == digest  # streamed from S3, same formula

    assert storage.download(uri, tmp_path / "back") == tmp_path / "back"
    assert storage.sha256_dir(tmp_path / "back") == digest
    for relative, data in files.items():
        assert (tmp_path / "back" / relative).read_bytes() == data


def test_folder_upload_replaces_prefix_contents(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    uri = f"s3://{s3_bucket}/model"
    _boto(s3_env).put_object(Bucket=s3_bucket, Key="model/old-shard.safetensors", Body=b"old")
    _boto(s3_env).put_object(Bucket=s3_bucket, Key="model-sibling/keep.txt", Body=b"keep")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "new.safetensors").write_bytes(b"new")
    storage.upload(tmp_path / "m", uri)
    assert storage.list_files(uri) == ["new.safetensors"]
    assert storage.read_bytes(f"s3://{s3_bucket}/model-sibling/keep.txt") == b"keep"


def test_download_replaces_local_folder(tmp_path: Path, s3_bucket: str) -> None:
    storage.write_text(f"s3://{s3_bucket}/d/a.txt", "a")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "stale.txt").write_text("stale")
    storage.download(f"s3://{s3_bucket}/d", tmp_path / "dest")
    assert storage.list_files(str(tmp_path / "dest")) == ["a.txt"]
    assert _leftovers(tmp_path) == []


def test_copy_between_s3_prefixes_and_files(tmp_path: Path, s3_bucket: str) -> None:
    _make_tree(tmp_path / "art")
    storage.copy(str(tmp_path / "art"), f"s3://{s3_bucket}/a")
    storage.copy(f"s3://{s3_bucket}/a", f"s3://{s3_bucket}/b")
    assert storage.sha256_uri(f"s3://{s3_bucket}/b") == storage.sha256_dir(tmp_path / "art")
    storage.copy(f"s3://{s3_bucket}/b/config.json", str(tmp_path / "config.json"))
    assert (tmp_path / "config.json").read_bytes() == (tmp_path / "art" / "config.json").read_bytes()


def test_multipart_upload_above_threshold(
    tmp_path: Path, s3_bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.MULTIPART_MB_ENV, "5")
    data = hashlib.sha256(b"seed").digest() * (12 * MIB // 32)  # 12 MiB -> parts of 5, 5, 2 MiB
    (tmp_path / "big.bin").write_bytes(data)
    uri = f"s3://{s3_bucket}/ckpt/big.bin"
    storage.upload(tmp_path / "big.bin", uri)
    etag = _boto(s3_env).head_object(Bucket=s3_bucket, Key="ckpt/big.bin")["ETag"]
    assert etag.strip('"').endswith("-3"), etag
    storage.download(uri, tmp_path / "big-back.bin")
    assert storage.sha256_file(tmp_path / "big-back.bin") == hashlib.sha256(data).hexdigest()


def test_small_file_is_a_single_part_upload(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    (tmp_path / "small.bin").write_bytes(b"x" * 1000)
    storage.upload(tmp_path / "small.bin", f"s3://{s3_bucket}/small.bin")
    etag = _boto(s3_env).head_object(Bucket=s3_bucket, Key="small.bin")["ETag"].strip('"')
    assert etag == hashlib.md5(b"x" * 1000).hexdigest()


# ----------------------------------------------------------------------------- S3 failures


def test_missing_bucket_is_named_with_endpoint(tmp_path: Path, s3_env: str) -> None:
    uri = "s3://no-such-bucket-xyz/data/train.parquet"
    expected = rf"S3 bucket 'no-such-bucket-xyz' does not exist \(endpoint {s3_env}"
    with pytest.raises(StorageError, match=expected):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match=expected):
        storage.exists(uri)
    with pytest.raises(StorageError, match=expected):
        storage.download(uri, tmp_path / "out")
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StorageError, match=expected):
        storage.upload(tmp_path / "f", uri)
    assert not (tmp_path / "out").exists()


def test_missing_key_names_uri_and_leaves_nothing(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    uri = f"s3://{s3_bucket}/wrong/key"
    expected = f"no object or prefix at {uri} \\(endpoint {s3_env}"
    with pytest.raises(StorageError, match=expected):
        storage.read_bytes(uri)
    with pytest.raises(StorageError, match=expected):
        storage.download(uri, tmp_path / "out")
    with pytest.raises(StorageError, match=expected):
        storage.sha256_uri(uri)
    with pytest.raises(StorageError, match=expected):
        storage.list_files(uri)
    assert list(tmp_path.iterdir()) == []


def test_failed_folder_download_keeps_old_local_folder(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    # "p/a" is a file and "p/a/b" needs "a" to be a folder: the second download must fail.
    _boto(s3_env).put_object(Bucket=s3_bucket, Key="p/a", Body=b"file")
    _boto(s3_env).put_object(Bucket=s3_bucket, Key="p/a/b", Body=b"nested")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "good.txt").write_text("good")
    with pytest.raises(StorageError, match=f"downloading s3://{s3_bucket}/p to .*dest failed"):
        storage.download(f"s3://{s3_bucket}/p", tmp_path / "dest")
    assert storage.list_files(str(tmp_path / "dest")) == ["good.txt"]
    assert _leftovers(tmp_path) == []


def test_key_escaping_the_folder_is_refused(tmp_path: Path, s3_bucket: str, s3_env: str) -> None:
    _boto(s3_env).put_object(Bucket=s3_bucket, Key="pre/../evil.txt", Body=b"x")
    with pytest.raises(StorageError, match=r"S3 key 'pre/\.\./evil\.txt' under .* does not map"):
        storage.download(f"s3://{s3_bucket}/pre", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_upload_refuses_bucket_root_empty_folder_and_missing_source(tmp_path: Path, s3_bucket: str) -> None:
    _make_tree(tmp_path / "art")
    with pytest.raises(StorageError, match=r"refusing to upload folder .* to the bucket root"):
        storage.upload(tmp_path / "art", f"s3://{s3_bucket}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match=r"nothing to upload: folder .*empty holds no files"):
        storage.upload(tmp_path / "empty", f"s3://{s3_bucket}/e")
    with pytest.raises(StorageError, match=r"cannot upload .*ghost .* no such file or folder"):
        storage.upload(tmp_path / "ghost", f"s3://{s3_bucket}/g")
    with pytest.raises(StorageError, match="names a bucket or prefix, not an object key"):
        storage.write_text(f"s3://{s3_bucket}/dir/", "x")


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_fast_with_its_url(monkeypatch: pytest.MonkeyPatch, s3_env: str) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "2")
    monkeypatch.setenv(storage.CONNECT_TIMEOUT_ENV, "1")
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint {endpoint}.*s3://bucket/key"):
        storage.read_bytes("s3://bucket/key")
    assert time.monotonic() - started < 10


def _set_moto_auth(endpoint: str, initial_no_auth_count: str) -> str:
    """Moto's server API for IAM enforcement (requests after the first N are authenticated);
    returns the previous setting so it can be restored."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=initial_no_auth_count.encode(),
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]


@pytest.fixture
def moto_auth(s3_env: str) -> Iterator[str]:
    """Enforce credentials on the shared moto server for one test, then restore its setting."""
    previous = _set_moto_auth(s3_env, "0")
    try:
        yield s3_env
    finally:
        _set_moto_auth(s3_env, previous)


def _real_access_key(endpoint: str) -> str:
    """An access key moto's IAM knows, so that a wrong secret gives SignatureDoesNotMatch."""
    iam = boto3.client("iam", endpoint_url=endpoint)
    user = f"u-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    return iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]


@pytest.mark.parametrize(
    ("known_key", "code"), [(False, "InvalidAccessKeyId"), (True, "SignatureDoesNotMatch")]
)
def test_rejected_credentials_are_explained_without_the_secret(
    known_key: bool,
    code: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    s3_env: str,
    request: pytest.FixtureRequest,
) -> None:
    secret = "sEcReT-value-that-must-not-leak"
    access_key = _real_access_key(s3_env) if known_key else "AKIANOTKNOWNTOMOTO00"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    request.getfixturevalue("moto_auth")
    uri = f"s3://{s3_bucket}/data.txt"
    with pytest.raises(StorageError) as caught:
        storage.read_bytes(uri)
    message = str(caught.value)
    assert f"S3 rejected the credentials or denied access for {uri} (endpoint {s3_env}" in message
    assert code in message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert secret not in message
    # HEAD answers have no body: the bare 403 must map to the same explanation.
    with pytest.raises(StorageError, match="S3 rejected the credentials") as caught:
        storage.exists(uri)
    assert secret not in str(caught.value)


def _counting_streams(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the key of every object `sha256_uri` streams through the hash."""
    streamed: list[str] = []
    stream = storage._sha256_object

    def counting(client: object, bucket: str, key: str) -> str:
        streamed.append(key)
        return stream(client, bucket, key)

    monkeypatch.setattr(storage, "_sha256_object", counting)
    return streamed


def test_s3_folder_digests_are_recorded_and_only_changed_objects_rehashed(
    tmp_path: Path, s3_bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _make_tree(tmp_path / "art")
    uri = f"s3://{s3_bucket}/runs/1/policy"
    storage.upload(tmp_path / "art", uri)
    streamed = _counting_streams(monkeypatch)

    assert storage.sha256_uri(uri) == storage.sha256_dir(tmp_path / "art")
    assert len(streamed) == len(files)
    records = _boto(s3_env).list_objects_v2(Bucket=s3_bucket, Prefix=storage.DIGEST_RECORD_PREFIX)["Contents"]
    assert len(records) == 1
    assert storage.list_files(uri) == sorted(files), "the record lives outside the folder"

    streamed.clear()
    assert storage.sha256_uri(uri + "/") == storage.sha256_dir(tmp_path / "art")
    assert streamed == [], "a second hash (trailing slash or not) reads no object"

    changed = sorted(files)[0]
    (tmp_path / "art" / changed).write_bytes(b"retrained weights")
    _boto(s3_env).put_object(Bucket=s3_bucket, Key=f"runs/1/policy/{changed}", Body=b"retrained weights")
    assert storage.sha256_uri(uri) == storage.sha256_dir(tmp_path / "art")
    assert streamed == [f"runs/1/policy/{changed}"]


@pytest.mark.parametrize(
    "record", [b"not json", json.dumps({"uri": "s3://elsewhere/model", "files": {}}).encode()]
)
def test_a_corrupt_or_foreign_digest_record_is_ignored(
    tmp_path: Path, s3_bucket: str, s3_env: str, monkeypatch: pytest.MonkeyPatch, record: bytes
) -> None:
    files = _make_tree(tmp_path / "art")
    uri = f"s3://{s3_bucket}/m"
    storage.upload(tmp_path / "art", uri)
    _boto(s3_env).put_object(Bucket=s3_bucket, Key=storage._record_key(uri), Body=record)
    streamed = _counting_streams(monkeypatch)
    assert storage.sha256_uri(uri) == storage.sha256_dir(tmp_path / "art")
    assert len(streamed) == len(files)
    saved = json.loads(
        _boto(s3_env).get_object(Bucket=s3_bucket, Key=storage._record_key(uri))["Body"].read()
    )
    assert saved["uri"] == uri and sorted(saved["files"]) == sorted(files), "rewritten for this folder"


def test_an_unwritable_digest_record_only_costs_a_rehash(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _make_tree(tmp_path / "art")
    uri = f"s3://{s3_bucket}/read-only"
    storage.upload(tmp_path / "art", uri)
    make_client = storage.s3_client

    def read_only_client() -> object:
        client = make_client()

        def refuse(**kwargs: object) -> None:
            error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
            raise storage.ClientError(error, "PutObject")

        client.put_object = refuse  # type: ignore[method-assign]
        return client

    monkeypatch.setattr(storage, "s3_client", read_only_client)
    with caplog.at_level("WARNING", logger="safe_rlhf_v.storage"):
        assert storage.sha256_uri(uri) == storage.sha256_dir(tmp_path / "art")
    assert "could not record the digests of" in caplog.text and "AccessDenied" in caplog.text
