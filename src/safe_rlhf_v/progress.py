"""Progress of a local pipeline run as a person reads it: one line per stage, k of N, elapsed time.

kfp.local logs each task's start and end on the root logger and streams each task's subprocess
output, which begins with the KFP executor's dump of the task's whole input (hundreds of lines per
task). By default the run shows instead one line per finished stage,

    [3/8] train-cost succeeded in 1m12s

and the stages' own output. `--verbose` (`VERBOSE_ENV`, which the task subprocesses inherit) keeps
everything, the repeated library warnings included.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from typing import TextIO

VERBOSE_ENV = "SAFE_RLHF_V_VERBOSE"
"""Set to 1 by `safe-rlhf-v --verbose`: kfp.local's dumps and repeated library warnings stay on."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '(?P<task>[^']+)'")
_FINISHED = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)")
_EXECUTOR_LOG = "[KFP Executor "
_INPUT_DUMP = "Got executor_input:"


def verbose() -> bool:
    """Whether this process, or the `safe-rlhf-v --verbose` that started it, asked for everything."""
    return os.environ.get(VERBOSE_ENV) == "1"


def elapsed(seconds: float) -> str:
    """`42s`, `1m12s` or `2h03m`: short enough for a progress line, exact enough to compare stages."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def stage_line(index: int, total: int, task: str, status: str, seconds: float) -> str:
    """One stage's progress line, e.g. `[3/8] train-cost succeeded in 1m12s`."""
    return f"[{index}/{total}] {task} {status} in {elapsed(seconds)}"


class StageProgress(logging.Filter):
    """A filter on the root logger that turns kfp.local's task records into progress lines.

    A filter on the logger itself, not on a handler: kfp.local replaces the root logger's handlers
    around every task, and a logger's filters survive that. kfp.local's own INFO records (task
    starts, the dump of every output) are dropped unless `show_all`; warnings and errors pass.
    """

    def __init__(self, total: int, stream: TextIO, *, show_all: bool = False) -> None:
        super().__init__()
        self.total = total
        self.stream = stream
        self.show_all = show_all
        self.finished = 0
        self.current: tuple[str, float] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Note a task's start or end; keep the record only if it is not kfp.local's INFO chatter."""
        if "kfp" not in record.pathname.replace("\\", "/").split("/"):
            return True
        message = _ANSI.sub("", record.getMessage())
        if started := _STARTED.search(message):
            self.current = (started["task"], time.monotonic())
        elif finished := _FINISHED.search(message):
            self.end(finished["task"], "succeeded" if finished["status"] == "SUCCESS" else "failed")
        return self.show_all or record.levelno >= logging.WARNING

    def end(self, task: str, status: str) -> None:
        """Print the line of a task that ended (kfp.local raises on a failure instead of logging it)."""
        started = self.current[1] if self.current and self.current[0] == task else time.monotonic()
        self.finished += 1
        self.current = None
        print(
            stage_line(self.finished, self.total, task, status, time.monotonic() - started), file=self.stream
        )
        self.stream.flush()

    def fail_current(self) -> None:
        """Print the failed line of the task that was running when the pipeline stopped."""
        if self.current is not None:
            self.end(self.current[0], "failed")


class QuietStream(io.TextIOBase):
    """Stdout without the KFP executor's dump of each task's input and its INFO lines.

    Task subprocesses print through kfp.local onto this process's stdout, line by line; the dump is
    the JSON block after `Got executor_input:`, which ends with a `}` at the dump's indentation.
    """

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target
        self.pending = ""
        self.dump_end: str | None = None

    def write(self, text: str) -> int:
        """Pass on every complete line that is not part of the dump."""
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if self.keep(line):
                self.target.write(line + "\n")
        return len(text)

    def keep(self, line: str) -> bool:
        """Whether a line of output is the stage's own (not the executor's dump or chatter)."""
        if self.dump_end is not None:
            if line.rstrip() == self.dump_end:
                self.dump_end = None
            return False
        if _EXECUTOR_LOG in line:
            if _INPUT_DUMP in line:
                self.dump_end = line[: line.index(_EXECUTOR_LOG)] + "}"
            return " INFO]" not in line
        stripped = line.strip()
        return bool(stripped) and set(stripped) != {"-"}

    def flush(self) -> None:
        """Pass on a last line without a newline, then flush the target."""
        if self.pending and self.keep(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()
