"""Contract tests of upload / submit / schedule / runs against a fake KFP v2beta1 API on 127.0.0.1.

The fake (fake_kfp_api.py) answers like the API server and rejects requests that break its
contract; each test checks the requests the real `kfp.Client` sent, and that the fake found no
problem with any of them.

No `from __future__ import annotations`: KFP reads the test pipeline's real parameter annotations.
"""

import hashlib
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from fake_kfp_api import FakeKfpApi
from kfp import compiler, dsl, kubernetes

from safe_rlhf_v import __version__
from safe_rlhf_v.cli import default_config_path, main
from safe_rlhf_v.config import load_config
from safe_rlhf_v.ops.kfp_ops import (
    KfpOpsError,
    PipelineOps,
    PipelineVersion,
    format_runs,
    kfp_cron,
    read_params,
)


@dsl.component(base_image="python:3.11-slim")
def _repeat(text: str, times: int) -> str:
    return text * times


def compile_tiny(path: Path, default_text: str = "hi") -> Path:
    """A small pipeline with one parameter of each kind the UI form shows, and a platform spec."""

    @dsl.pipeline(name="tiny")
    def tiny(
        text: str = default_text,
        times: int = 2,
        ratio: float = 0.5,
        enabled: bool = True,
        variants: list = ["a"],  # noqa: B006 (a pipeline default, not a mutable argument)
    ) -> None:
        task = _repeat(text=text, times=times)
        kubernetes.use_secret_as_env(task, "s3-creds", {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"})

    compiler.Compiler().compile(tiny, package_path=str(path))
    return path


@pytest.fixture
def fake() -> Iterator[FakeKfpApi]:
    with FakeKfpApi() as api:
        yield api


@pytest.fixture
def ops(fake: FakeKfpApi, monkeypatch: pytest.MonkeyPatch) -> PipelineOps:
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    return PipelineOps.connect(fake.url)


@pytest.fixture
def uploaded(ops: PipelineOps, tmp_path: Path) -> Callable[[str], str]:
    """Upload the tiny pipeline with a given default text; returns the new version's id."""

    def upload(default_text: str) -> str:
        package = compile_tiny(tmp_path / f"tiny-{default_text}.yaml", default_text)
        return ops.upload(package, pipeline_name="tiny").version_id

    return upload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- upload ------------------------------------------------------------------------------------


def test_upload_creates_the_pipeline_empty_then_versions_named_by_content(
    fake: FakeKfpApi, ops: PipelineOps, tmp_path: Path
) -> None:
    first = compile_tiny(tmp_path / "v1.yaml", "hi")
    first_name = f"{__version__}-{hashlib.sha256(first.read_bytes()).hexdigest()[:10]}"
    created = ops.upload(first, pipeline_name="tiny", description="Safe RLHF-V")
    assert (created.action, created.version_name) == ("created pipeline", first_name)
    (create,) = fake.calls("POST", "/pipelines")
    assert create.json == {"display_name": "tiny", "description": "Safe RLHF-V"}
    (version_upload,) = fake.calls("POST", "/pipelines/upload_version")
    assert version_upload.query == {
        "name": first_name,
        "pipelineid": created.pipeline_id,
        "description": "Safe RLHF-V",
    }
    assert version_upload.files["uploadfile"] == first.read_bytes()

    # The same spec again, also right after the pipeline was created: no second copy of it.
    again = ops.upload(first, pipeline_name="tiny")
    assert (again.action, again.version_id) == ("already uploaded", created.version_id)
    assert len(fake.versions) == 1

    second = compile_tiny(tmp_path / "v2.yaml", "hello")
    added = ops.upload(second, pipeline_name="tiny")
    expected_name = f"{__version__}-{hashlib.sha256(second.read_bytes()).hexdigest()[:10]}"
    assert (added.action, added.version_name, added.pipeline_id) == (
        "new version",
        expected_name,
        created.pipeline_id,
    )
    assert len(fake.calls("POST", "/pipelines")) == 1 and len(fake.versions) == 2
    stored = fake.versions[added.version_id]["pipeline_spec"]
    assert set(stored) == {"pipeline_spec", "platform_spec"}  # the platform spec (secrets) went up too
    assert fake.problems == []


def test_upload_reuses_a_pipeline_another_upload_created_meanwhile(
    fake: FakeKfpApi, ops: PipelineOps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = PipelineOps.connect(fake.url)
    package = compile_tiny(tmp_path / "v1.yaml")
    first_lookup = iter([None])
    monkeypatch.setattr(ops, "pipeline_id", lambda name: next(first_lookup, other.pipeline_id(name)))
    other.upload(package, pipeline_name="tiny")  # wins the race between the lookup and the create
    done = ops.upload(package, pipeline_name="tiny")
    assert done.action == "already uploaded" and len(fake.pipelines) == 1 and len(fake.versions) == 1
    assert [p for p in fake.problems if "already exists" not in p] == []


def test_upload_command_compiles_the_real_pipeline_under_the_configs_name(
    fake: FakeKfpApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.setenv("KFP_HOST", fake.url)
    cfg = load_config(default_config_path())
    assert main(["upload"]) == 0
    (create,) = fake.calls("POST", "/pipelines")
    (upload,) = fake.calls("POST", "/pipelines/upload_version")
    spec = next(yaml.safe_load_all(upload.files["uploadfile"]))
    assert create.json["display_name"] == spec["pipelineInfo"]["name"] == cfg.name
    assert "data_uri" in spec["root"]["inputDefinitions"]["parameters"]  # the UI form's data set URI
    assert f"created pipeline: pipeline {next(iter(fake.pipelines))}" in capsys.readouterr().out

    assert main(["upload"]) == 0
    assert "already uploaded" in capsys.readouterr().out
    assert main(["upload", "--version-name", "hand-named"]) == 0
    assert fake.calls("POST", "/pipelines/upload_version")[-1].query["name"] == "hand-named"
    assert len(fake.versions) == 2
    assert fake.problems == []


# --- submit ------------------------------------------------------------------------------------


def test_submit_runs_the_latest_version_with_the_file_parameters_in_an_experiment(
    fake: FakeKfpApi, ops: PipelineOps, uploaded: Callable[[str], str], tmp_path: Path
) -> None:
    uploaded("hi")
    latest = uploaded("hello")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("text: bye\ntimes: 3\nratio: 1\nvariants: [x, y]\n")
    params = read_params(params_file)

    run_id = ops.submit(
        pipeline_name="tiny", params=params, experiment="retrain", run_name="manual", service_account="runner"
    )
    (create,) = fake.calls("POST", "/runs")
    experiment_id = fake.calls("POST", "/experiments")[0].json
    assert experiment_id == {"display_name": "retrain", "namespace": ""}
    assert create.json == {
        "experiment_id": next(iter(fake.experiments)),
        "display_name": "manual",
        "pipeline_version_reference": {
            "pipeline_id": next(iter(fake.pipelines)),
            "pipeline_version_id": latest,
        },
        "runtime_config": {"parameters": {"text": "bye", "times": 3, "ratio": 1.0, "variants": ["x", "y"]}},
        "service_account": "runner",
    }
    assert isinstance(create.json["runtime_config"]["parameters"]["ratio"], float)  # NUMBER_DOUBLE
    assert run_id in fake.runs

    ops.submit(pipeline_name="tiny", params={}, experiment="retrain")
    assert len(fake.calls("POST", "/experiments")) == 1  # the experiment is found, not created twice
    assert fake.calls("POST", "/runs")[1].json["display_name"].startswith("tiny 20")
    assert fake.problems == []


def test_submit_rejects_unknown_or_mistyped_parameters_listing_the_pipeline_parameters(
    fake: FakeKfpApi, ops: PipelineOps, uploaded: Callable[[str], str]
) -> None:
    uploaded("hi")
    with pytest.raises(KfpOpsError) as caught:
        ops.submit(pipeline_name="tiny", params={"txet": "x", "times": "3", "enabled": 1}, experiment="e")
    message = str(caught.value)
    assert "unknown parameter(s) txet" in message
    assert "times must be NUMBER_INTEGER, got str '3'" in message
    assert "enabled must be BOOLEAN, got int 1" in message
    assert (
        "The pipeline's parameters are: enabled (BOOLEAN), ratio (NUMBER_DOUBLE), text (STRING), "
        "times (NUMBER_INTEGER), variants (LIST)"
    ) in message
    assert fake.calls("POST", "/runs") == [] and fake.calls("POST", "/experiments") == []


def test_parameters_that_json_cannot_carry_are_rejected_by_name(
    fake: FakeKfpApi, ops: PipelineOps, uploaded: Callable[[str], str], tmp_path: Path
) -> None:
    uploaded("hi")
    params_file = tmp_path / "params.yaml"
    params_file.write_text("variants: [2026-01-01]\n")  # YAML reads an unquoted date as a date
    with pytest.raises(
        KfpOpsError, match=r"^parameter variants: \[datetime\.date\(2026, 1, 1\)\] \(list\) is not"
    ):
        ops.submit(pipeline_name="tiny", params=read_params(params_file), experiment="e")
    with pytest.raises(KfpOpsError, match=r"^parameter ratio: nan \(float\) is not a JSON value"):
        ops.schedule(
            pipeline_name="tiny", cron="0 3 * * 0", name="w", params={"ratio": float("nan")}, experiment="e"
        )
    assert fake.calls("POST", "/runs") == [] and fake.calls("POST", "/recurringruns") == []


def test_parameters_without_a_default_are_required() -> None:
    version = PipelineVersion("p", "v", "v1", {"data_uri": {"parameterType": "STRING"}})
    with pytest.raises(
        KfpOpsError, match=r"v1: data_uri \(STRING\) is required\. The pipeline's parameters are"
    ):
        version.check({})
    version.check({"data_uri": "s3://bucket/data"})


def test_submit_names_a_missing_pipeline(fake: FakeKfpApi, ops: PipelineOps) -> None:
    with pytest.raises(
        KfpOpsError, match=r"no pipeline named tiny at http://127\.0\.0\.1:\d+: run `safe-rlhf-v upload`"
    ):
        ops.submit(pipeline_name="tiny", params={}, experiment="e")


def test_submit_command_reads_the_parameter_file_and_reports_bad_names(
    fake: FakeKfpApi, uploaded: Callable[[str], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uploaded("hi")
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("times: 4\n")
    bad.write_text("tims: 4\n")
    argv = ["submit", "--host", fake.url, "--pipeline-name", "tiny", "--experiment", "nightly"]
    assert main([*argv, "--params", str(good), "--run-name", "r1"]) == 0
    assert f"run: {next(iter(fake.runs))}" in capsys.readouterr().out
    assert main([*argv, "--params", str(bad)]) == 2
    assert "unknown parameter(s) tims" in capsys.readouterr().err
    assert main([*argv, "--params", str(tmp_path / "missing.yaml")]) == 2
    assert f"parameter file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err
    assert len(fake.runs) == 1


# --- schedule ----------------------------------------------------------------------------------


def test_schedule_creates_one_enabled_recurring_run_that_follows_the_latest_version(
    fake: FakeKfpApi, ops: PipelineOps, uploaded: Callable[[str], str]
) -> None:
    uploaded("hi")
    done = ops.schedule(
        pipeline_name="tiny",
        cron="0 3 * * 0",
        name="weekly",
        params={"times": 5, "text": "s3://bucket/data"},
        experiment="retrain",
        service_account="runner",
    )
    assert (done.action, done.status) == ("created", "ENABLED")
    (create,) = fake.calls("POST", "/recurringruns")
    body = create.json
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
    assert (body["max_concurrency"], body["no_catchup"], body["mode"]) == ("1", True, "ENABLE")
    assert body["pipeline_version_reference"] == {"pipeline_id": next(iter(fake.pipelines))}
    assert body["runtime_config"] == {"parameters": {"times": 5, "text": "s3://bucket/data"}}
    assert (body["display_name"], body["experiment_id"]) == ("weekly", next(iter(fake.experiments)))
    assert body["service_account"] == "runner", "runs need the account that may create TrainJobs"

    # A cron tick parses each stored value as JSON, as KFP's controller does: the URI survives.
    latest = uploaded("hello")
    run = fake.trigger(done.recurring_run_id)
    assert run["runtime_config"]["parameters"] == {"times": 5, "text": "s3://bucket/data"}
    assert fake.problems == [] and latest in fake.versions


def test_schedule_is_idempotent_and_replaces_a_schedule_whose_settings_changed(
    fake: FakeKfpApi, ops: PipelineOps, uploaded: Callable[[str], str]
) -> None:
    uploaded("hi")
    weekly = {"pipeline_name": "tiny", "name": "weekly", "experiment": "retrain", "service_account": "runner"}
    first = ops.schedule(cron="0 3 * * 0", params={"times": 5}, **weekly)
    uploaded("hello")  # a new version does not change the schedule: it names no version
    again = ops.schedule(cron="0 3 * * 0", params={"times": 5}, **weekly)
    assert (again.action, again.recurring_run_id) == ("unchanged", first.recurring_run_id)
    assert (
        len(fake.calls("POST", "/recurringruns")) == 1
        and fake.calls("DELETE", f"/recurringruns/{first.recurring_run_id}") == []
    )

    changed = ops.schedule(cron="0 4 * * 0", params={"times": 5}, **weekly)
    assert changed.action == "replaced" and changed.recurring_run_id != first.recurring_run_id
    assert list(fake.recurring_runs) == [changed.recurring_run_id]
    assert fake.recurring_runs[changed.recurring_run_id]["trigger"] == {
        "cron_schedule": {"cron": "0 0 4 * * 0"}
    }
    ops.schedule(cron="0 4 * * 0", params={"times": 6}, **weekly)
    assert len(fake.recurring_runs) == 1

    # Duplicates left by an older tool are cleaned up; the one with these settings is kept.
    kept = next(iter(fake.recurring_runs))
    fake.recurring_runs["dup"] = fake.recurring_runs[kept] | {"recurring_run_id": "dup", "description": ""}
    assert ops.schedule(cron="0 4 * * 0", params={"times": 6}, **weekly).recurring_run_id == kept
    assert list(fake.recurring_runs) == [kept]
    other = ops.schedule(cron="0 4 * * 0", params={"times": 6}, **(weekly | {"name": "nightly"}))
    assert other.action == "created" and len(fake.recurring_runs) == 2
    assert fake.problems == []


def test_schedule_command_says_what_it_did(
    fake: FakeKfpApi, uploaded: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    uploaded("hi")
    argv = ["schedule", "--host", fake.url, "--pipeline-name", "tiny", "--cron", "0 3 * * 0"]
    assert main(argv) == 0
    created = capsys.readouterr().out.splitlines()[-1]
    assert created.startswith("recurring run created: ") and "(ENABLED; cron 0 0 3 * * 0" in created
    assert main(argv) == 0
    kept = capsys.readouterr().out.splitlines()[-1]
    assert kept.startswith(f"recurring run unchanged: {next(iter(fake.recurring_runs))}")
    assert [r["display_name"] for r in fake.recurring_runs.values()] == ["tiny-retrain"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [("0 3 * * 0", "0 0 3 * * 0"), ("  30 2 1 * *  ", "0 30 2 1 * *"), ("15 0 9 ? * 2-6", "15 0 9 ? * 2-6")],
)
def test_cron_is_converted_to_kfp_six_fields(given: str, expected: str) -> None:
    assert kfp_cron(given) == expected


def test_cron_with_a_wrong_field_count_is_rejected() -> None:
    with pytest.raises(KfpOpsError, match=r"cron '0 3 \* \*' has 4 fields: give 5"):
        kfp_cron("0 3 * *")


# --- runs --------------------------------------------------------------------------------------


def test_runs_lists_the_newest_runs_with_their_states(
    fake: FakeKfpApi, ops: PipelineOps, uploaded: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    uploaded("hi")
    first = ops.submit(pipeline_name="tiny", params={}, experiment="a", run_name="first")
    second = ops.submit(pipeline_name="tiny", params={}, experiment="b", run_name="second")
    fake.finish_run(first, "SUCCEEDED")

    rows = ops.recent_runs(limit=10)
    assert [(r.name, r.state, r.run_id, r.finished is None) for r in rows] == [
        ("second", "PENDING", second, True),
        ("first", "SUCCEEDED", first, False),
    ]
    assert [r.name for r in ops.recent_runs(limit=1)] == ["second"]
    assert [r.name for r in ops.recent_runs(experiment="a")] == ["first"]
    with pytest.raises(KfpOpsError, match="no experiment named nope"):
        ops.recent_runs(experiment="nope")

    lines = format_runs(rows).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "CREATED", "(UTC)", "FINISHED", "(UTC)", "RUN", "ID"]
    # The fake's clock starts 2026-01-01 00:00 and ticks a minute per created object.
    created_second, created_first = (fake.runs[i]["created_at"] for i in (second, first))
    assert lines[1].split() == ["second", "PENDING", *created_second.rstrip("Z").split("T"), "-", second]
    assert lines[2].split()[:4] == ["first", "SUCCEEDED", *created_first.rstrip("Z").split("T")]
    assert format_runs([]) == "no runs"

    assert main(["runs", "--host", fake.url, "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "second" in out and "first" not in out
    (listing, *_) = [r for r in fake.calls("GET", "/runs") if r.query.get("page_size") == "1"]
    assert listing.query["sort_by"] == "created_at desc"
    assert fake.problems == []


# --- connection and credentials ----------------------------------------------------------------


def test_token_is_sent_as_bearer_and_never_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = "s3cr3t-token-value"
    monkeypatch.setenv("KFP_TOKEN", token)
    with FakeKfpApi(token=token) as fake:
        assert main(["runs", "--host", fake.url]) == 0
        assert all(r.headers["authorization"] == f"Bearer {token}" for r in fake.requests)
        assert fake.problems == []
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err


def test_a_pod_authenticates_with_its_projected_service_account_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("projected-token-1")
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    with FakeKfpApi(token="projected-token-1") as fake:
        ops = PipelineOps.connect(fake.url)
        ops.recent_runs()
        token_file.write_text("projected-token-2")  # the kubelet rotated it
        fake.token = "projected-token-2"
        ops.recent_runs()
        assert fake.problems == []


def test_missing_and_unreachable_hosts_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KFP_HOST", raising=False)
    with pytest.raises(KfpOpsError, match="no Kubeflow Pipelines host: pass --host URL or set KFP_HOST"):
        PipelineOps.connect()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(KfpOpsError, match=rf"cannot reach the Kubeflow Pipelines API at {dead} \(connect\)"):
        PipelineOps.connect(dead)
    assert main(["runs", "--host", dead]) == 2
    assert f"cannot reach the Kubeflow Pipelines API at {dead}" in capsys.readouterr().err


def test_api_errors_name_the_request_and_the_server_message(
    fake: FakeKfpApi, ops: PipelineOps, tmp_path: Path
) -> None:
    not_a_pipeline = tmp_path / "notes.yaml"
    not_a_pipeline.write_text("notes: not a pipeline\n")
    with pytest.raises(KfpOpsError) as caught:
        ops.upload(not_a_pipeline, pipeline_name="tiny")
    digest = hashlib.sha256(not_a_pipeline.read_bytes()).hexdigest()[:10]
    assert str(caught.value) == (
        f"upload version {__version__}-{digest} of tiny failed at {fake.url}: HTTP 400 Bad Request: "
        "uploadfile is not a compiled KFP pipeline spec (pipelineInfo, root, schemaVersion)"
    )


def test_parameter_files_must_hold_a_mapping(tmp_path: Path) -> None:
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(KfpOpsError, match=r"list\.yaml must hold a mapping of parameter name to value"):
        read_params(listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(KfpOpsError, match=r"broken\.yaml is not valid YAML"):
        read_params(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_params(empty) == {}
