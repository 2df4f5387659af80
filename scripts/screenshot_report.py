"""Screenshot an evaluation report in headless Chromium, to check by eye that tables and plots show.

    python scripts/screenshot_report.py work/.../report.html report.png

Uses Debian's Chromium (`apt-get install -y chromium`) with a throw-away profile and every
background service that could reach the network switched off; the report itself loads nothing
external. Exits non-zero with the reason when Chromium is missing, fails, or writes no PNG.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WINDOW = "1280,4000"
TIMEOUT_S = 120


def find_chromium() -> str:
    """The Chromium binary, or exit with the command that installs it."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    sys.exit("chromium not found: install it with `apt-get install -y chromium` (Debian/Ubuntu)")


def screenshot(report: Path, out: Path, chromium: str) -> None:
    """Render `report` at 1280x4000 into `out`; raise if Chromium writes no PNG."""
    out.unlink(missing_ok=True)  # a stale PNG must not pass for a fresh one
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={out.resolve()}",
            f"--window-size={WINDOW}",
            report.resolve().as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if not out.is_file() or out.read_bytes()[:8] != PNG_SIGNATURE:
        raise RuntimeError(
            f"chromium (exit {done.returncode}) wrote no PNG to {out}; "
            f"its stderr ends:\n{done.stderr[-2000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the report's HTML file")
    parser.add_argument("out", type=Path, help="where to write the PNG screenshot")
    args = parser.parse_args(argv)
    if not args.report.is_file():
        parser.error(f"report {args.report} does not exist")
    try:
        screenshot(args.report, args.out, find_chromium())
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"screenshot failed: {error}", file=sys.stderr)
        return 1
    print(f"screenshot written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
