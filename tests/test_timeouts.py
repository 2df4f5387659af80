"""Slow failures end as one clear error: an S3 endpoint that never answers, MLflow refusing to connect."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from safe_rlhf_v import registry, storage, tracking
from safe_rlhf_v.cli import main
from safe_rlhf_v.config import TrackingConfig, config_from_dict
from safe_rlhf_v.errors import UserError


def unset(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Unset variables so that the package's defaults apply, and restore them after the test even
    when the package sets them (a bare `delenv` of an absent variable records nothing to restore)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture
def closed_port() -> int:
    """A port that was free a moment ago: nothing listens there, so connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("call", [storage.read_text, storage.exists], ids=["read_text", "exists"])
def test_s3_endpoint_that_never_answers_times_out_naming_the_uri(
    call: object, silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", silent_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv(storage.READ_TIMEOUT_ENV, "0.5")
    monkeypatch.setenv(storage.MAX_ATTEMPTS_ENV, "1")
    uri = "s3://bucket/some/key.json"
    with pytest.raises(storage.StorageError, match=rf"timed out: no answer for {uri} within 0\.5 s"):
        call(uri)  # type: ignore[operator]


def test_s3_read_timeout_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.READ_TIMEOUT_ENV, "soon")
    with pytest.raises(storage.StorageError, match=f"{storage.READ_TIMEOUT_ENV}='soon' is not a valid float"):
        storage.s3_client()


def test_mlflow_http_defaults_fill_only_what_the_user_left_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    unset(monkeypatch, "MLFLOW_HTTP_REQUEST_TIMEOUT")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    tracking.http_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(tracking.HTTP_TIMEOUT_S)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"


def test_refused_mlflow_server_fails_quickly_with_one_line(
    tmp_path: Path, closed_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only the package's defaults (2 retries), not MLflow's 7 retries over four minutes."""
    unset(monkeypatch, "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    uri = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(UserError, match=rf"MLflow tracking server {uri} is unreachable"):
        tracking.configure(TrackingConfig(tracking_uri=uri), tmp_path)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == str(tracking.HTTP_MAX_RETRIES)


def test_registry_client_gets_the_http_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unset(monkeypatch, "MLFLOW_HTTP_REQUEST_TIMEOUT")
    cfg = config_from_dict({"work_dir": str(tmp_path), "data": {"uri": "d"}, "base_model": "m"})
    registry.client_for(cfg)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == str(tracking.HTTP_TIMEOUT_S)


def test_password_in_the_tracking_uri_is_never_printed(
    tmp_path: Path, closed_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cret@127.0.0.1:{closed_port}")
    config = tmp_path / "c.yaml"
    config.write_text(f"work_dir: {tmp_path / 'work'}\ndata: {{uri: d}}\nbase_model: m\n")
    assert main(["models", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert "s3cret" not in captured.err + captured.out
    assert f"http://***@127.0.0.1:{closed_port} is unreachable" in captured.err
