"""The command line: stages run from it, and user mistakes exit 2 with one clear message."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from pipeline_yaml import config_file

import safe_rlhf_v
from safe_rlhf_v.cli import build_parser, main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-data")
    assert (
        main(["make-demo-data", "--out", str(out), "--rows", "60", "--eval-rows", "20", "--seed", "1"]) == 0
    )
    return out


def test_every_subcommand_has_help() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert {"make-demo-data", "make-demo-model", "validate-data", "run", "compile"} <= set(helps)
    assert all(text and len(text) > 10 for text in helps.values()), helps


def test_make_demo_data_writes_both_splits(data_dir: Path) -> None:
    train = datasets.Dataset.from_parquet(str(data_dir / "train.parquet"))
    assert len(train) == 60
    assert len(datasets.Dataset.from_parquet(str(data_dir / "evaluation.parquet"))) == 20


def test_validate_data_command_publishes_validated_data(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "validated"
    code = main(["validate-data", "--config", str(config_file(tmp_path, data_dir)), "--out", str(out)])
    assert code == 0
    assert json.loads((out / "statistics.json").read_text())["train"]["rows"] == 60
    assert (out / "dataset" / "train").is_dir()
    assert "validated data:" in capsys.readouterr().out


def test_validate_data_failure_exits_2_naming_the_expectation(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "validated"
    config = config_file(tmp_path, data_dir)
    code = main(
        [
            "validate-data",
            "--config",
            str(config),
            "--out",
            str(out),
            "--set",
            "validate_data.min_rows.train=1000",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "failed validation" in err and "row_count" in err
    assert not (out / "dataset").exists()
    assert (out / "validation.json").exists(), "reports are kept for diagnosis"


def test_misspelled_override_exits_2(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = config_file(tmp_path, data_dir)
    code = main(
        [
            "validate-data",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "validate_data.min_row=3",
        ]
    )
    assert code == 2
    assert "validate_data.min_row: unknown key" in capsys.readouterr().err


def test_missing_data_exits_2(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = config_file(tmp_path, data_dir)
    code = main(
        [
            "validate-data",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "o"),
            "--data",
            str(tmp_path / "nope"),
        ]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"safe-rlhf-v {safe_rlhf_v.__version__}"
