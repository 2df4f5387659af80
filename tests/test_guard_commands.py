"""The guard as a stage and as commands: train-guard outputs, moderate, guarded-generate, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from safe_rlhf_v.cli import main
from safe_rlhf_v.models.guard import GuardModel


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, validated_data: Path) -> Path:
    work = tmp_path_factory.mktemp("guard-work")
    config = work / "pipeline.yaml"
    quick = {"max_length": 192, "train": {"epochs": 1, "max_steps": 2, "per_device_batch_size": 8}}
    config.write_text(
        yaml.safe_dump(
            {
                "work_dir": str(work),
                "data": {"uri": "unused"},
                "base_model": str(tiny_model),
                "train_guard": quick,
            }
        )
    )
    out = work / "guard"
    before = {p: p.read_bytes() for p in validated_data.rglob("*") if p.is_file()}
    assert (
        main(["train-guard", "--config", str(config), "--data", str(validated_data), "--out", str(out)]) == 0
    )
    after = {p: p.read_bytes() for p in validated_data.rglob("*") if p.is_file()}
    assert after == before, "training wrote into (or changed) the validated data it read"
    return out


def test_train_guard_publishes_a_guard_with_reports(guard_dir: Path) -> None:
    assert GuardModel.load(guard_dir).categories[0] == "animal_abuse"
    metrics = json.loads((guard_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["safe_accuracy"] <= 1.0 and "severity" in metrics["confusion"]
    assert (guard_dir / "confusion_severity.png").stat().st_size > 1000
    assert json.loads((guard_dir / "lineage.json").read_text())["kind"] == "guard"


def test_moderate_prints_a_json_verdict(
    guard_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    code = main(
        [
            "moderate",
            "--guard",
            str(guard_dir),
            "--image",
            str(image),
            "--question",
            "What now?",
            "--response",
            "Sure.",
        ]
    )
    assert code == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["query"]["severity"] in ("safe", "minor", "moderate", "severe")
    assert verdict["response"]["rating"] in range(-3, 4)
    for part in ("query", "response"):  # one convention for both: `safe` and `severity`, no `unsafe`
        assert {"safe", "severity"} <= set(verdict[part]) and "unsafe" not in verdict[part], part
    assert verdict["query"]["safe"] == (verdict["query"]["severity"] == "safe")


def test_moderate_rejects_bad_inputs(
    guard_dir: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(["moderate", "--guard", str(guard_dir), "--image", str(broken), "--question", "q"]) == 2
    assert "cannot read image" in capsys.readouterr().err
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    assert main(["moderate", "--guard", str(guard_dir), "--image", str(good), "--question", " "]) == 2
    assert "--question is empty" in capsys.readouterr().err
    assert main(["moderate", "--guard", str(tiny_model), "--image", str(good), "--question", "q"]) == 2
    assert "is not a guard model" in capsys.readouterr().err


def test_guarded_generate_writes_traces_and_summary(
    guard_dir: Path, tiny_model: Path, demo_data: Path, tmp_path: Path
) -> None:
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "work_dir": str(tmp_path / "work"),
                "data": {"uri": str(demo_data)},
                "base_model": str(tiny_model),
                "guardrail": {"rounds": 2, "generation": {"max_new_tokens": 8}},
            }
        )
    )
    out = tmp_path / "guarded.json"
    args = [
        "guarded-generate",
        "--config",
        str(config),
        "--policy",
        str(tiny_model),
        "--guard",
        str(guard_dir),
    ]
    assert main([*args, "--data", str(demo_data), "--out", str(out), "--limit", "6"]) == 0
    written = json.loads(out.read_text())
    summary, traces = written["summary"], written["traces"]
    assert summary["requests"] == 6 and len(traces) == 6
    assert sum(summary["outcomes"].values()) == 6
    assert all(t["rounds_used"] <= 2 for t in traces)
    assert all(t["answer"] for t in traces)
