"""The bad-input catalogue: every mistake a user can make on the command line ends the same way.

Each case runs `safe_rlhf_v.cli.main` in-process and checks four things: exit status 2; stderr is
exactly one line that names the bad input (the path, key, value or URI); nothing half-written (no
output folder appears, a pre-existing one is byte-for-byte untouched); and nothing of the user's
deleted (every input folder and file hashes the same before and after). Most cases fail before
any model is built, so the catalogue stays fast.

Focused tests below cover what the catalogue cannot: a bug's traceback survives, operating-system
errors, the redaction rules, the model-folder checks and number parsing in YAML.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pytest
import torch.utils.cpp_extension  # noqa: F401  (on a CPU machine torch warns once on import; not in a case)
from PIL import Image

import safe_rlhf_v.stages.train_guard
import safe_rlhf_v.stages.train_ppo
import safe_rlhf_v.stages.train_score  # noqa: F401  (DeepSpeed warns once on import, not per case)
from safe_rlhf_v import cli
from safe_rlhf_v.config import load_config
from safe_rlhf_v.data.sources import DataSourceError, load_split
from safe_rlhf_v.errors import redact
from safe_rlhf_v.models.loading import ModelFolderError, ModelFolderMissing, checked_model_source

SECRET = "s3cret"


@dataclass(frozen=True)
class Case:
    """One bad input. `argv` and `names` are templates over the paths of the `world` fixture."""

    id: str
    argv: tuple[str, ...]
    names: str
    env: dict[str, str] = field(default_factory=dict)
    out: str | None = "{out}"
    """The output location the command would write, which must not appear (None: no output)."""


def config_case(id: str, *sets: str, names: str) -> Case:
    """A config mistake, given to validate-data (every command loads its config first)."""
    setting = [arg for key_value in sets for arg in ("--set", key_value)]
    return Case(id, (*VALIDATE, *setting), names)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "SAFE_RLHF_V_S3_MAX_ATTEMPTS": "1",
    "SAFE_RLHF_V_S3_READ_TIMEOUT": "0.5",
}
PPO = ("train-ppo-lag", "--reward-model", "{pickle}", "--cost-model", "{pickle}")
VALIDATE = ("validate-data", "--config", "{config}", "--out", "{out}")
MODERATE = ("moderate", "--guard", "{no_config}", "--question", "q")


def train(stage: str, *args: str) -> tuple[str, ...]:
    """A training stage's argv: the world's config and output, then `args`."""
    return (stage, "--config", "{config}", "--out", "{out}", *args)


def with_config(path: str) -> tuple[str, ...]:
    return ("validate-data", "--config", path, "--out", "{out}")


NAN = "train_ppo_lag.lagrangian.threshold=.nan"
REFUSED_S3 = S3_ENV | {"AWS_ENDPOINT_URL_S3": f"http://minio:{SECRET}@127.0.0.1:{{closed}}"}
REFUSED_MLFLOW = {
    "MLFLOW_TRACKING_URI": f"http://user:{SECRET}@127.0.0.1:{{closed}}",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
}

CASES = [
    # --- configuration ------------------------------------------------------------------------
    config_case("unknown-key", "validate_data.min_row=3", names="validate_data.min_row"),
    config_case("wrong-type", "train_reward.train.epochs=three", names="train_reward.train.epochs"),
    config_case("negative-epochs", "train_cost.train.epochs=-1", names="train_cost.train.epochs"),
    config_case("nan-threshold", NAN, names="train_ppo_lag.lagrangian.threshold"),
    config_case("inf-lambda-init", "train_ppo_lag.lagrangian.init=.inf", names="lagrangian.init"),
    config_case("negative-inf", "evaluate.tie_margin=-.inf", names="evaluate.tie_margin"),
    config_case("set-not-yaml", "train_reward.train.epochs=[3", names="train_reward.train.epochs=[3"),
    config_case("set-without-value", "train_reward.train.epochs", names="train_reward.train.epochs"),
    config_case("set-under-a-value", "data.uri.path=x", names="data.uri.path"),
    config_case("lambda-init-above-max", "train_ppo_lag.lagrangian.init=30", names="init=30.0"),
    config_case("batch-not-divisible", "train_ppo_lag.prompt_batch_size=3", names="prompt_batch_size=3"),
    config_case("reserved-prompt-set", "evaluate.extra_prompt_sets={{evaluation: x}}", names="extra_prompt"),
    config_case("unpinned-image", "images.gpu=registry/train:latest", names="registry/train:latest"),
    config_case("unknown-lr-schedule", "train_guard.train.lr_scheduler=step", names="lr_scheduler"),
    Case("config-missing", with_config("{tmp}/nope.yaml"), "{tmp}/nope.yaml"),
    Case("config-not-mapping", with_config("{list_yaml}"), "{list_yaml} must hold a mapping"),
    Case("config-not-yaml", with_config("{broken_yaml}"), "{broken_yaml} is not valid YAML"),
    Case("config-is-folder", with_config("{data}"), "config file {data} cannot be read"),
    Case("nan-breaks-compile", ("compile", "--config", "{config}", "--out", "{out}/p.yaml", "--set", NAN),
         "train_ppo_lag.lagrangian.threshold"),
    # --- data ---------------------------------------------------------------------------------
    Case("data-missing", (*VALIDATE, "--data", "{tmp}/gone"), "{tmp}/gone"),
    Case("gs-uri", (*VALIDATE, "--data", "gs://bucket/data"), "gs://bucket/data"),
    Case("s3-without-bucket", (*VALIDATE, "--data", "s3:///data"), "s3:///data"),
    Case("hub-without-name", (*VALIDATE, "--data", "hf://"), "hf://"),
    Case("empty-parquet", (*VALIDATE, "--data", "{empty_parquet}"), "{empty_parquet} is empty"),
    Case("empty-jsonl", (*VALIDATE, "--data", "{empty_jsonl}"), "{empty_jsonl} is empty"),
    Case("csv-file", (*VALIDATE, "--data", "{csv}"), "{csv}"),
    Case("folder-without-splits", (*VALIDATE, "--data", "{empty_dir}"), "{empty_dir}"),
    Case("unvalidated-data-to-reward", train("train-reward", "--data", "{data}"),
         "{data} is not a validate-data output"),
    Case("missing-data-to-guard", train("train-guard", "--data", "{tmp}/gone"), "{tmp}/gone"),
    # --- models -------------------------------------------------------------------------------
    Case("pickle-only-reward-base", train("train-reward", "--data", "{validated}", "--base-model",
                                          "{pickle}"),
         "{pickle} holds only pickle weights (pytorch_model.bin): only safetensors"),
    Case("pickle-only-guard-base", train("train-guard", "--data", "{validated}", "--base-model", "{pickle}"),
         "{pickle} holds only pickle weights"),
    Case("pickle-only-policy", (*PPO, "--config", "{config}", "--out", "{out}", "--data", "{validated}",
                                "--policy", "{pickle}"), "{pickle} holds only pickle weights"),
    Case("model-without-config", train("train-cost", "--data", "{validated}", "--base-model", "{no_config}"),
         "{no_config} has no config.json"),
    Case("model-missing", train("train-reward", "--data", "{validated}", "--base-model", "{tmp}/m/gone"),
         "{tmp}/m/gone does not exist"),
    Case("moderate-not-an-image", (*MODERATE, "--image", "{not_image}"), "--image {not_image}", out=None),
    Case("moderate-missing-image", (*MODERATE, "--image", "{tmp}/none.png"), "{tmp}/none.png", out=None),
    Case("moderate-empty-question", (*MODERATE, "--image", "{image}", "--question", " "), "--question",
         out=None),
    Case("moderate-not-a-guard", (*MODERATE, "--image", "{image}"), "{no_config} is not a guard model",
         out=None),
    # --- arguments, storage, tracking ---------------------------------------------------------
    Case("zero-rows", ("make-demo-data", "--out", "{out}", "--rows", "0"), "rows must be at least 1, got 0"),
    Case("one-seed", ("seeds", "--config", "{config}", "--out", "{out}", "--seeds", "1", "1", "--set",
                      "evaluate.ground_truth=true", "--set", "ablations=[reward-only]"), "--seeds"),
    Case("params-file-missing", ("submit", "--config", "{config}", "--params", "{tmp}/params.yaml"),
         "{tmp}/params.yaml", out=None),
    Case("s3-never-answers", (*VALIDATE, "--data", "s3://bucket/data"),
         "timed out: no answer for s3://bucket/data", env=S3_ENV | {"AWS_ENDPOINT_URL_S3": "{silent}"}),
    Case("s3-refuses", (*VALIDATE, "--data", "s3://bucket/d"),
         "cannot reach S3 endpoint http://***@127.0.0.1:{closed}", env=REFUSED_S3),
    Case("s3-timeout-typo", (*VALIDATE, "--data", "s3://b/d"), "SAFE_RLHF_V_S3_READ_TIMEOUT='soon'",
         env=S3_ENV | {"SAFE_RLHF_V_S3_READ_TIMEOUT": "soon"}),
    Case("mlflow-refuses", ("models", "--config", "{config}"), "http://***@127.0.0.1:{closed} is unreachable",
         env=REFUSED_MLFLOW, out=None),
    Case("promote-unknown-model", ("promote", "--config", "{config}", "--model", "nope", "--version", "1",
                                   "--to", "staging"), "'nope'", out=None),
]  # fmt: skip


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself) by path."""
    paths = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in paths}


@pytest.fixture
def world(tmp_path: Path, demo_data: Path, validated_data: Path, silent_endpoint: str) -> dict[str, str]:
    """The user's files, good and bad, by template name."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    config = tmp_path / "config.yaml"
    config.write_text(f"work_dir: {tmp_path / 'work'}\ndata: {{uri: {data}}}\nbase_model: {tmp_path}/model\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("data: [\n")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "train.csv").write_text("question,image\n")
    (tmp_path / "empty-dir").mkdir()
    pickle = tmp_path / "pickle-model"
    pickle.mkdir()
    (pickle / "config.json").write_text('{"model_type": "llava"}')
    (pickle / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"{}")
    (tmp_path / "not-image.png").write_text("this is text")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "image.png")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    return {
        "tmp": str(tmp_path),
        "out": str(tmp_path / "out"),
        "config": str(config),
        "data": str(data),
        "validated": str(validated_data),
        "list_yaml": str(tmp_path / "list.yaml"),
        "broken_yaml": str(tmp_path / "broken.yaml"),
        "empty_parquet": str(tmp_path / "empty.parquet"),
        "empty_jsonl": str(tmp_path / "empty.jsonl"),
        "csv": str(tmp_path / "train.csv"),
        "empty_dir": str(tmp_path / "empty-dir"),
        "pickle": str(pickle),
        "no_config": str(no_config),
        "not_image": str(tmp_path / "not-image.png"),
        "image": str(tmp_path / "image.png"),
        "silent": silent_endpoint,
        "closed": str(closed),
    }


def test_the_catalogue_is_large_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)
    assert len({case.argv + tuple(case.env.items()) for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_naming_it_and_harms_nothing(
    case: Case,
    world: dict[str, str],
    validated_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    datasets.disable_progress_bars()
    for name, value in case.env.items():
        monkeypatch.setenv(name, value.format(**world))
    inputs = [Path(world[name]) for name in ("data", "config", "pickle", "no_config", "image")]
    inputs.append(validated_data)
    before = {name: digest for path in inputs for name, digest in file_digests(path).items()}
    capsys.readouterr()

    code = cli.main([arg.format(**world) for arg in case.argv])

    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert case.names.format(**world) in lines[0]
    assert SECRET not in captured.err + captured.out
    if case.out is not None:
        assert not Path(case.out.format(**world)).exists(), "a failed command left an output behind"
    after = {name: digest for path in inputs for name, digest in file_digests(path).items()}
    changed = sorted(name for name, digest in before.items() if after.get(name) != digest)
    assert not changed, f"the command deleted or rewrote the user's files {changed}"


# ----------------------------------------------------------------------------------- focused tests


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain ValueError or KeyError is a defect here, not a user mistake: it must not become exit 2."""

    def broken(_: object) -> int:
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(cli, "cmd_make_demo_data", broken)
    with pytest.raises(ValueError, match="internal invariant broken"):
        cli.main(["make-demo-data", "--out", "x"])


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, "error: no space left on device: /data/out/shard.bin (free space and rerun)"),
        (errno.EDQUOT, "error: disk quota exceeded: /data/out/shard.bin"),
        (errno.EACCES, "error: permission denied: /data/out/shard.bin"),
        (errno.EPERM, "error: operation not permitted: /data/out/shard.bin"),
        (errno.EROFS, "error: read-only file system: /data/out/shard.bin (choose a writable location)"),
    ],
)
def test_fixable_os_errors_are_one_line_naming_the_path(
    code: int, expected: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(_: object) -> int:
        raise OSError(code, "refused", "/data/out/shard.bin")

    monkeypatch.setattr(cli, "cmd_make_demo_data", full)
    assert cli.main(["make-demo-data", "--out", "x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected)


def test_other_os_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def io_error(_: object) -> int:
        raise OSError(errno.EIO, "input/output error", "/dev/sda")

    monkeypatch.setattr(cli, "cmd_make_demo_data", io_error)
    with pytest.raises(OSError, match="input/output error"):
        cli.main(["make-demo-data", "--out", "x"])


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("http://user:s3cret@mlflow:5000", "http://***@mlflow:5000"),
        ("https://token@host/api?x=1", "https://***@host/api?x=1"),
        ("postgresql://app:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("mysql+pymysql://root:hunter2@db/mlflow", "mysql+pymysql://***@db/mlflow"),
        ("s3://AKIA:secret@bucket/key", "s3://***@bucket/key"),
        ("https://h/p?X-Amz-Signature=abc&X-Amz-Credential=AKIA&n=2",
         "https://h/p?X-Amz-Signature=***&X-Amz-Credential=***&n=2"),
        ("https://h/p?access_token=abc#frag", "https://h/p?access_token=***#frag"),
        ("server http://a:b@h:1 and s3://bucket/k", "server http://***@h:1 and s3://bucket/k"),
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
        ("s3://bucket/user@example.com/file", "s3://bucket/user@example.com/file"),
    ],
)  # fmt: skip
def test_redact_masks_credentials_and_keeps_the_location(uri: str, shown: str) -> None:
    assert redact(uri) == shown


def test_model_checks_pass_good_folders_and_hub_ids(tiny_model: Path) -> None:
    assert checked_model_source(tiny_model) == str(tiny_model)
    assert checked_model_source("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    with pytest.raises(ModelFolderMissing, match="does not exist"):
        checked_model_source("./models/absent")
    with pytest.raises(ModelFolderError, match=r"has no config\.json"):
        checked_model_source(tiny_model.parent)
    sharded = tiny_model.parent / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text("{}")
    with pytest.raises(ModelFolderError, match=r"holds no weights \(\*\.safetensors\)"):
        checked_model_source(sharded)
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert checked_model_source(sharded) == str(sharded)


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(DataSourceError, match=rf"cannot read {tmp_path / 'train.parquet'} as parquet"):
        load_split(str(tmp_path), "train", cache_dir=tmp_path / "cache")


def test_exponent_floats_without_a_dot_are_floats(tmp_path: Path) -> None:
    """PyYAML alone reads `5e-07` as the string '5e-07', which a strict float field refuses."""
    config = tmp_path / "c.yaml"
    config.write_text("data: {uri: d}\nbase_model: m\ntrain_ppo_lag:\n  lagrangian: {lr: 5e-07}\n")
    cfg = load_config(config, overrides=["train_reward.train.learning_rate=1E-5", "evaluate.tie_margin=2e3"])
    assert cfg.train_ppo_lag.lagrangian.lr == 5e-07
    assert cfg.train_reward.train.learning_rate == 1e-05
    assert cfg.evaluate.tie_margin == 2000.0
    assert load_config(config, overrides=["name=1e5x"]).name == "1e5x"
