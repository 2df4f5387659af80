"""The local run's progress lines, and the kfp.local output they replace."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from safe_rlhf_v import progress

KFP_LOCAL = "/venv/lib/python3.11/site-packages/kfp/local/task_dispatcher.py"


def kfp_record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    """A record as kfp.local logs it on the root logger (colored task names included)."""
    return logging.LogRecord("root", level, KFP_LOCAL, 1, message, None, None)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0s"), (42, "42s"), (72, "1m12s"), (3599.6, "1h00m"), (7380, "2h03m")]
)
def test_elapsed_time_reads_as_minutes_and_seconds(seconds: float, text: str) -> None:
    assert progress.elapsed(seconds) == text


def test_each_finished_task_prints_one_line_with_k_of_n_and_kfp_chatter_is_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 172.0, 200.0, 205.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    report = progress.StageProgress(8, out)
    kept = [
        report.filter(kfp_record("Executing task \x1b[96m'train-cost'\x1b[0m")),
        report.filter(
            kfp_record("Task \x1b[96m'train-cost'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m")
        ),
        report.filter(kfp_record("Task 'train-cost' outputs:\n    Output: '{\"stage\": ...}'")),
        report.filter(kfp_record("Executing task 'train-guard'")),
        report.filter(kfp_record("something went wrong", logging.WARNING)),
    ]
    report.fail_current()
    assert kept == [False, False, False, False, True], "only warnings and errors of kfp.local pass"
    assert out.getvalue().splitlines() == [
        "[1/8] train-cost succeeded in 1m12s",
        "[2/8] train-guard failed in 5s",
    ]


def test_records_of_other_loggers_and_verbose_runs_pass_unchanged() -> None:
    report = progress.StageProgress(8, io.StringIO(), show_all=True)
    assert report.filter(kfp_record("Task 'x' outputs: ..."))
    quiet = progress.StageProgress(8, io.StringIO())
    assert quiet.filter(logging.LogRecord("safe_rlhf_v.x", logging.INFO, "/src/x.py", 1, "ours", None, None))


def test_quiet_stream_drops_the_executor_input_dump_and_keeps_the_stage_output() -> None:
    target = io.StringIO()
    stream = progress.QuietStream(target)
    indent = "    "
    lines = [
        "[KFP Executor 2026-01-01 10:00:00,000 INFO]: Looking for component `validate_data`",
        "[KFP Executor 2026-01-01 10:00:00,001 INFO]: Got executor_input:",
        "{",
        '    "inputs": {',
        '        "parameterValues": {"config": "/work/runs/1/config.json"}',
        "    }",
        "}",
        "2026-01-01 10:00:01 INFO safe_rlhf_v.stages.validate_data: 600 train rows",
        "",
        "-" * 80,
        "[KFP Executor 2026-01-01 10:00:02,000 WARNING]: kept",
    ]
    for line in lines:
        stream.write(indent)  # kfp.local indents each streamed line with a separate write
        stream.write(line + "\n")
    stream.write("no newline yet")
    stream.flush()
    assert target.getvalue() == (
        f"{indent}2026-01-01 10:00:01 INFO safe_rlhf_v.stages.validate_data: 600 train rows\n"
        f"{indent}[KFP Executor 2026-01-01 10:00:02,000 WARNING]: kept\n"
        "no newline yet"
    )


def test_deepspeed_cpu_warning_is_hidden_unless_verbose() -> None:
    code = (
        "import logging, safe_rlhf_v;"
        "from deepspeed.utils import logger;"
        "logger.warning('Setting accelerator to CPU. If you have GPU ...');"
        "logger.warning('another warning')"
    )
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "another warning" in quiet.stderr + quiet.stdout
    assert "Setting accelerator" not in quiet.stderr + quiet.stdout
    env = {**os.environ, progress.VERBOSE_ENV: "1"}
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "Setting accelerator to CPU" in loud.stderr + loud.stdout
