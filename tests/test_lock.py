"""The locked environment: the locks agree with pyproject.toml and with each other, and the venv the
tests run in holds exactly what the dev lock names.

`make install` installs requirements/lock-dev.txt with `--require-hashes --no-deps`, so a fresh clone
on any later day gets the same versions; these tests catch a lock that drifted from pyproject.toml
(someone edited a range without `make lock`) and a venv that drifted from the lock.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
DEV_LOCK = ROOT / "requirements" / "lock-dev.txt"
PINS = ROOT / "requirements" / "pins.txt"
ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [sha256 hashes])} of a pip-compile --generate-hashes file."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for line in path.read_text().splitlines():
        match = ENTRY.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            entries[current] = (match.group(2), [])
        elif current is not None and (hashed := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current][1].append(hashed.group(1))
    return entries


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_locked_package_is_an_exact_version_with_hashes() -> None:
    for path in (LOCK, DEV_LOCK):
        entries = read_lock(path)
        assert len(entries) > 100, f"{path.name}: only {len(entries)} entries parsed"
        unhashed = [name for name, (_, hashes) in entries.items() if not hashes]
        assert unhashed == [], f"{path.name}: no hash for {unhashed}"
        text = path.read_text()
        # A lock that names this machine's package mirrors would not install anywhere else.
        assert "--extra-index-url" not in text and "--find-links" not in text, path.name


@pytest.mark.parametrize(
    ("lock", "groups"),
    [(LOCK, ("dependencies", "server")), (DEV_LOCK, ("dependencies", "server", "dev"))],
    ids=["runtime", "dev"],
)
def test_lock_pins_every_declared_dependency_inside_its_range(lock: Path, groups: tuple[str, ...]) -> None:
    meta, entries = project(), read_lock(lock)
    declared = [
        Requirement(spec)
        for group in groups
        for spec in (
            meta["dependencies"] if group == "dependencies" else meta["optional-dependencies"][group]
        )
    ]
    problems = []
    for requirement in declared:
        locked = entries.get(canonicalize_name(requirement.name))
        if locked is None:
            problems.append(f"{requirement.name}: not in {lock.name}")
        elif not requirement.specifier.contains(Version(locked[0]), prereleases=True):
            problems.append(f"{requirement.name}=={locked[0]} is outside {requirement.specifier}")
    assert problems == [], f"run `make lock`: {problems}"


def test_dev_lock_is_the_runtime_lock_plus_test_tools() -> None:
    """The images install lock.txt, the venv lock-dev.txt: every runtime package is the same file."""
    runtime, dev = read_lock(LOCK), read_lock(DEV_LOCK)
    differing = {name: (entry[0], dev.get(name, ("missing",))[0]) for name, entry in runtime.items()
                 if dev.get(name) != entry}  # fmt: skip
    assert differing == {}, f"runtime lock vs dev lock: {differing}"


def test_locks_follow_the_pins() -> None:
    for line in PINS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            for path in (LOCK, DEV_LOCK):
                assert read_lock(path)[canonicalize_name(pin.name)][0] in pin.specifier, (path.name, line)


def test_the_venv_holds_exactly_the_dev_lock() -> None:
    """What `make install` promises: every locked version installed, nothing else beside it."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"tests run outside the project's .venv ({sys.prefix})")
    locked = {name: version for name, (version, _) in read_lock(DEV_LOCK).items()}
    # Only what is installed in site-packages: setuptools puts its vendored packages' metadata on
    # sys.path once imported, and those are not the venv's.
    site_packages = sysconfig.get_paths()["purelib"]
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=[site_packages])
    }
    # The package itself (editable), and the installer the venv was created with.
    ours = {canonicalize_name(project()["name"]), "pip"}
    wrong = {name: (installed.get(name), version) for name, version in locked.items()
             if installed.get(name) != version}  # fmt: skip
    extra = sorted(set(installed) - set(locked) - ours)
    assert wrong == {}, f"installed vs locked: {wrong}; run `make install`"
    assert extra == [], f"installed but not locked: {extra}"
