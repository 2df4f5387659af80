"""Scale a training stage out: N processes in this pod with torchrun, or several nodes as a TrainJob.

`launch_mode` reads the stage's `ResourcesConfig`:

* `in-process` (`gpus <= 1`, `nodes == 1`): the component calls the stage function itself; nothing
  here is involved.
* `torchrun` (`gpus > 1`, `nodes == 1`): `run_stage` starts `torchrun --standalone` with one process
  per GPU in this pod, each running the stage's CLI subcommand, and streams their output.
* `trainjob` (`nodes > 1`): `run_stage` creates a Kubeflow Trainer v2 `TrainJob`
  (`trainer.kubeflow.org/v1alpha1`, Trainer >= v2.2.0: older releases drop `runtimePatches`
  without a word, and with it `/dev/shm`, the node selector and tolerations) on the runtime named
  by `KubernetesConfig.trainer_runtime`, polls it until it completes and raises `TrainJobFailed`
  when it fails, so the KFP task fails too. `numProcPerNode` is always set: the GPUs per node, or
  1 on CPU nodes (left out, the torch policy would start one rank per requested CPU).

Every training process, whichever launcher started it, runs the same entry point, `safe_rlhf_v.cli`
with the stage's argv, and `train.distributed.init_distributed` joins the process group from
RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. How those variables arise per
runtime policy (`KubernetesConfig.trainer_policy`):

* `torch` (`torch-distributed`): the Trainer injects PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
  PET_MASTER_ADDR and PET_MASTER_PORT into every node, and `torchrun` (which reads PET_* as its
  defaults) starts one rank per GPU.
* `mpi` (`safe-rlhf-v-deepspeed`, OpenMPI: node pods run sshd, the launcher pod runs the command
  and is a rank itself): the launcher runs `python3 -m safe_rlhf_v.ops.launch mpirun -- ARGV`,
  which starts one rank per hostfile slot; each rank runs
  `python3 -m safe_rlhf_v.ops.launch rank -- ARGV`, which maps OpenMPI's OMPI_COMM_WORLD_*
  variables to the torch ones. The Trainer puts the TrainJob's image on the launcher only, so the
  runtime's node pods must name an image with this package: manifests/base/trainer-runtime.yaml
  does (the stock `deepspeed-distributed` does not).

TrainJob pods do not share the component pod's filesystem: stage inputs and outputs must be
`s3://` URIs, and the pipeline config travels as JSON in the `SAFE_RLHF_V_CONFIG_JSON` variable,
which the `rank` entry writes to a file and passes as `--config`. Credentials reach the pods only
as `secretKeyRef`s to the S3 and MLflow Secrets; no value is ever written into a manifest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from safe_rlhf_v.config import KubernetesConfig, ResourcesConfig
from safe_rlhf_v.errors import UserError

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

LaunchMode = Literal["in-process", "torchrun", "trainjob"]

CLI_ENTRY: tuple[str, ...] = ("-m", "safe_rlhf_v.cli")
"""What each torchrun process runs in a pod: the package CLI (followed by the stage's argv)."""
CONFIG_ENV = "SAFE_RLHF_V_CONFIG_JSON"
MASTER_PORT = 29500
TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
PATCH_MANAGER = "safe-rlhf-v"
MPI_HOSTFILE_ENV = "OMPI_MCA_orte_default_hostfile"  # set by the Trainer on the MPI launcher

S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")

_MPI_RUNTIME_VARS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONUNBUFFERED")
"""Forwarded to every MPI rank when set: sshd starts remote ranks with a bare environment."""
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_PATH_FLAGS = re.compile(r"^--(config|data|out|base-model|policy|reward-model|cost-model)$")


class LaunchError(UserError, ValueError):
    """A launch the config or the arguments make impossible (no namespace, a local path for a
    TrainJob, a label Kubernetes refuses); the message names the setting."""


class TrainJobFailed(RuntimeError):
    """The TrainJob reached the `Failed` condition (or could not be created); the message says why."""


def launch_mode(resources: ResourcesConfig) -> LaunchMode:
    """How a stage with these resources runs: in this process, under torchrun, or as a TrainJob."""
    if resources.nodes > 1:
        return "trainjob"
    return "torchrun" if resources.gpus > 1 else "in-process"


# --- one pod, N GPUs: torchrun ------------------------------------------------------------------


def torchrun_command(stage_argv: Sequence[str], gpus: int, *, entry: Sequence[str] = CLI_ENTRY) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m safe_rlhf_v.cli ARGV`, under this interpreter.

    `python -m torch.distributed.run` is `torchrun` without relying on PATH, so the ranks run in the
    same environment as the component. `--standalone` rendezvouses on a free local port, so several
    stages on one node never collide. `entry` is what each rank executes before the argv.
    """
    if gpus < 2:
        raise ValueError(f"torchrun needs gpus >= 2 processes, got {gpus}: run the stage in-process")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus)]
    return [*launcher, *entry, *stage_argv]


def run_streaming(
    command: Sequence[str], *, out: IO[str] | None = None, env: Mapping[str, str] | None = None
) -> int:
    """Run `command`, copying its merged stdout/stderr line by line to `out`; returns its exit code.

    Streaming (rather than capturing) keeps a long training run's progress visible in the KFP task
    log as it happens. If this process is interrupted the child is killed, never left orphaned.
    """
    sink = out or sys.stdout
    with subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=dict(env) if env is not None else None,
    ) as process:
        try:
            for line in process.stdout or ():
                sink.write(line)
                sink.flush()
            return process.wait()
        finally:
            if process.poll() is None:
                process.kill()


# --- several nodes: Kubeflow Trainer TrainJob ----------------------------------------------------


def secret_env_vars(kube: KubernetesConfig) -> dict[str, tuple[str, str]]:
    """Environment variable -> (Secret name, key) for the S3 and MLflow credentials of training pods.

    The Secrets hold one key per variable, named like the variable (see `KubernetesConfig`), so a
    pipeline task (kfp-kubernetes `use_secret_as_env`) and a TrainJob read them the same way.
    """
    pairs = {name: (kube.s3_secret, name) for name in S3_SECRET_KEYS}
    if kube.mlflow_secret is not None:
        pairs |= {name: (kube.mlflow_secret, name) for name in MLFLOW_SECRET_KEYS}
    return pairs


def resolve_namespace(kube: KubernetesConfig, service_account_file: Path = SERVICE_ACCOUNT_NAMESPACE) -> str:
    """`kube.namespace`, else the namespace of the pod this runs in (its service-account mount)."""
    if kube.namespace:
        return kube.namespace
    try:
        namespace = service_account_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        namespace = ""
    if not namespace:
        raise LaunchError(
            f"no namespace for the TrainJob: set kubernetes.namespace in the config "
            f"({service_account_file} is missing or empty, so this is not running in a pod)"
        )
    return namespace


def trainjob_name(stage: str, run_id: str) -> str:
    """A fresh RFC 1035 name (<= 63 chars) from the stage and run, with a random suffix.

    The suffix makes every submission distinct, so a retried KFP task starts a new TrainJob (which
    resumes from the stage's checkpoints) instead of colliding with the failed one.
    """
    stem = re.sub(r"[^a-z0-9-]+", "-", f"{stage}-{run_id[:8]}".lower()).strip("-")
    if not stem or not stem[0].isalpha():
        stem = f"job-{stem}".rstrip("-")
    return f"{stem[:56].rstrip('-')}-{secrets.token_hex(3)}"


def trainjob_labels(stage: str, run_id: str) -> dict[str, str]:
    """Labels tying a TrainJob to its stage and pipeline run (`pipeline/runid` as on KFP's own pods)."""
    labels = {
        "app.kubernetes.io/part-of": "safe-rlhf-v",
        "safe-rlhf-v/stage": stage,
        "pipeline/runid": run_id,
    }
    for key, value in labels.items():
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            raise LaunchError(f"label {key}={value!r} is not a valid Kubernetes label value")
    return labels


def trainjob_manifest(
    name: str,
    *,
    image: str,
    stage_argv: Sequence[str],
    resources: ResourcesConfig,
    kube: KubernetesConfig,
    namespace: str,
    config_json: str | None = None,
    env: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The `TrainJob` that runs `stage_argv` on `resources.nodes` nodes of `resources.gpus` GPUs each.

    Plain settings come from `kube.env` and `env`, the config from `config_json`, credentials as
    `secretKeyRef`s from `secret_env_vars(kube)`. `/dev/shm` is memory-backed (NCCL needs more than
    the 64 MiB default) and GPU node selectors and tolerations apply, through `runtimePatches`.
    """
    if not _RFC1035.match(name) or len(name) > 63:
        raise LaunchError(f"TrainJob name {name!r} must be an RFC 1035 label of at most 63 characters")
    _reject_local_paths(stage_argv)
    env_entries = _trainjob_env(kube, config_json, env)
    command, args = _trainjob_entry(stage_argv, kube, [entry["name"] for entry in env_entries])
    trainer: dict[str, Any] = {
        "numNodes": resources.nodes,
        "numProcPerNode": max(1, resources.gpus),
        "image": image,
        "command": command,
        "args": args,
        "env": env_entries,
        "resourcesPerNode": _resources_per_node(resources),
    }
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": {
            "runtimeRef": {
                "apiGroup": TRAINER_GROUP,
                "kind": "ClusterTrainingRuntime",
                "name": kube.trainer_runtime,
            },
            "trainer": trainer,
            "runtimePatches": [_runtime_patch(resources, kube)],
        },
    }


def _reject_local_paths(stage_argv: Sequence[str]) -> None:
    """TrainJob pods cannot see this pod's files: every path-valued flag must point to object storage."""
    for flag, value in itertools.pairwise(stage_argv):
        if _PATH_FLAGS.match(flag) and value.startswith(("/", "./", "../", "file:")):
            hint = "pass the config as config_json" if flag == "--config" else "pass an s3:// URI"
            raise LaunchError(
                f"{flag} {value} is a local path of this pod, which the TrainJob's pods cannot read: {hint}"
            )


def _trainjob_env(
    kube: KubernetesConfig, config_json: str | None, env: Mapping[str, str] | None
) -> list[dict[str, Any]]:
    plain = {"PYTHONUNBUFFERED": "1", **kube.env, **(env or {})}
    if config_json is not None:
        plain[CONFIG_ENV] = config_json
    secret_refs = secret_env_vars(kube)
    clash = sorted(set(plain) & set(secret_refs))
    if clash:
        raise LaunchError(f"{', '.join(clash)} must come from the Secret, not as plain env values")
    entries: list[dict[str, Any]] = [{"name": key, "value": value} for key, value in sorted(plain.items())]
    entries += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": secret_key}}}
        for key, (secret, secret_key) in sorted(secret_refs.items())
    ]
    return entries


def _trainjob_entry(
    stage_argv: Sequence[str], kube: KubernetesConfig, env_names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Command and args of the trainer container for the runtime's policy (see the module docstring)."""
    if kube.trainer_policy == "torch":
        return ["torchrun", "-m", "safe_rlhf_v.ops.launch"], ["rank", "--", *stage_argv]
    exports = ",".join(env_names)
    return ["python3", "-m", "safe_rlhf_v.ops.launch"], ["mpirun", "--export", exports, "--", *stage_argv]


def _resources_per_node(resources: ResourcesConfig) -> dict[str, dict[str, str]]:
    requests = {"cpu": resources.cpu, "memory": resources.memory}
    limits = {"memory": resources.memory}
    if resources.gpus:
        requests[resources.accelerator] = limits[resources.accelerator] = str(resources.gpus)
    return {"requests": requests, "limits": limits}


def _runtime_patch(resources: ResourcesConfig, kube: KubernetesConfig) -> dict[str, Any]:
    """Shared memory on every training pod; GPU node selectors and tolerations when it uses GPUs."""
    pod: dict[str, Any] = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": kube.shm_size}}],
        "containers": [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if resources.gpus:
        if kube.gpu_node_selector:
            pod["nodeSelector"] = dict(kube.gpu_node_selector)
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in kube.gpu_tolerations]
    jobs = ["node"] if kube.trainer_policy == "torch" else ["node", "launcher"]
    replicated = [{"name": job, "template": {"spec": {"template": {"spec": pod}}}} for job in jobs]
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": replicated}}},
    }


def _default_api_client() -> ApiClient:
    """In a pod: its service account; elsewhere: the current kubeconfig context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def _condition(status: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for condition in status.get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def _progress(status: Mapping[str, Any]) -> str:
    """One line: the newest condition and the child jobs' counts, e.g. `Created (...); node: 2 active`."""
    conditions = status.get("conditions") or []
    head = "waiting for the Trainer controller"
    if conditions:
        last = conditions[-1]
        head = (
            f"{last.get('type')}={last.get('status')} ({last.get('reason', '')}: {last.get('message', '')})"
        )
    jobs = [
        f"{job.get('name')}: {job.get('active', 0)} active, {job.get('succeeded', 0)} succeeded, "
        f"{job.get('failed', 0)} failed"
        for job in status.get("jobsStatus") or []
    ]
    return "; ".join([head, *jobs])


def submit_trainjob(
    manifest: Mapping[str, Any],
    *,
    api_client: ApiClient | None = None,
    poll_s: float = 10.0,
    timeout_s: float = 7 * 24 * 3600.0,
    out: IO[str] | None = None,
) -> str:
    """Create the TrainJob, print its progress as it changes, return its name once `Complete`.

    Raises `TrainJobFailed` with the controller's message when the job fails or cannot be created,
    and `TimeoutError` after `timeout_s` (the job is deleted first so it stops holding GPUs).
    """
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    sink = out or sys.stdout
    api = CustomObjectsApi(api_client or _default_api_client())
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = dict(group=TRAINER_GROUP, version=TRAINER_VERSION, namespace=namespace, plural=TRAINJOB_PLURAL)
    try:
        api.create_namespaced_custom_object(body=dict(manifest), **where)
    except ApiException as error:
        raise TrainJobFailed(f"cannot create TrainJob {namespace}/{name}: {_api_message(error)}") from None
    print(
        f"TrainJob {namespace}/{name} created on runtime {manifest['spec']['runtimeRef']['name']}", file=sink
    )
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        status = api.get_namespaced_custom_object(name=name, **where).get("status") or {}
        line = _progress(status)
        if line != last:
            print(f"TrainJob {name}: {line}", file=sink, flush=True)
            last = line
        if _condition(status, "Complete"):
            return name
        failed = _condition(status, "Failed")
        if failed:
            raise TrainJobFailed(
                f"TrainJob {namespace}/{name} failed: {failed.get('reason', '')}: {failed.get('message', '')}"
            )
        if time.monotonic() >= deadline:
            api.delete_namespaced_custom_object(name=name, **where)
            raise TimeoutError(
                f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f}s; deleted it"
            )
        time.sleep(poll_s)


def _api_message(error: Exception) -> str:
    """`HTTP 409 Conflict: <the API server's message>`."""
    status, reason, body = (
        getattr(error, "status", ""),
        getattr(error, "reason", ""),
        getattr(error, "body", ""),
    )
    try:
        detail = json.loads(body).get("message", body)
    except (TypeError, ValueError, AttributeError):
        detail = body
    return f"HTTP {status} {reason}: {detail}".strip()


def run_stage(
    stage_argv: Sequence[str],
    resources: ResourcesConfig,
    kube: KubernetesConfig,
    *,
    image: str,
    stage: str,
    run_id: str,
    config_json: str | None = None,
    env: Mapping[str, str] | None = None,
    api_client: ApiClient | None = None,
    poll_s: float = 10.0,
    timeout_s: float = 7 * 24 * 3600.0,
    out: IO[str] | None = None,
    entry: Sequence[str] = CLI_ENTRY,
) -> int:
    """Launch a stage's CLI command across GPUs or nodes; returns the exit code (0 for a TrainJob).

    For `launch_mode(resources) == "in-process"` there is nothing to launch: the caller runs the
    stage function directly, and calling this is an error. Under torchrun `stage_argv` may use
    local paths (same pod) and `entry` is what each rank runs; for a TrainJob they must be `s3://`
    URIs and the config comes from `config_json`.
    """
    mode = launch_mode(resources)
    if mode == "in-process":
        raise ValueError(
            f"{stage} with gpus={resources.gpus}, nodes={resources.nodes} runs in-process: "
            "call the stage function instead of run_stage"
        )
    if mode == "torchrun":
        return run_streaming(torchrun_command(stage_argv, resources.gpus, entry=entry), out=out)
    manifest = trainjob_manifest(
        trainjob_name(stage, run_id),
        image=image,
        stage_argv=stage_argv,
        resources=resources,
        kube=kube,
        namespace=resolve_namespace(kube),
        config_json=config_json,
        env=env,
        labels=trainjob_labels(stage, run_id),
    )
    submit_trainjob(manifest, api_client=api_client, poll_s=poll_s, timeout_s=timeout_s, out=out)
    return 0


# --- entry points inside TrainJob pods ----------------------------------------------------------


def rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch launcher variables of an OpenMPI rank (empty under torchrun, which sets them itself)."""
    if "RANK" in environ or "OMPI_COMM_WORLD_RANK" not in environ:
        return {}
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if key not in environ]
    if missing:
        raise RuntimeError(f"MPI rank without {', '.join(missing)}: start ranks with `launch mpirun`")
    return {
        "RANK": environ["OMPI_COMM_WORLD_RANK"],
        "WORLD_SIZE": environ["OMPI_COMM_WORLD_SIZE"],
        "LOCAL_RANK": environ["OMPI_COMM_WORLD_LOCAL_RANK"],
    }


def rank_argv(stage_argv: Sequence[str], environ: Mapping[str, str], config_dir: Path) -> list[str]:
    """The stage argv plus `--config FILE` written from `SAFE_RLHF_V_CONFIG_JSON` when that is set."""
    argv = list(stage_argv)
    if CONFIG_ENV not in environ:
        return argv
    if "--config" in argv:
        raise LaunchError(f"both --config and {CONFIG_ENV} are set; the TrainJob passes the config once")
    config = config_dir / "config.json"  # JSON is YAML: load_config reads it as is
    config.write_text(environ[CONFIG_ENV], encoding="utf-8")
    return [*argv, "--config", str(config)]


def mpirun_command(
    stage_argv: Sequence[str], *, hostfile: Path, exports: Sequence[str], environ: Mapping[str, str]
) -> list[str]:
    """`mpirun` over the Trainer's hostfile: one `launch rank` per slot, rendezvous at the first host.

    OpenMPI maps ranks by slot, so rank 0 lives on the hostfile's first host: that host is
    MASTER_ADDR. `-x NAME` forwards a variable's value from this pod without writing it into argv.
    """
    try:
        hosts = [
            line.split()[0] for line in hostfile.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"MPI hostfile {hostfile} is missing: is this the Trainer's launcher pod?"
        ) from None
    if not hosts:
        raise LaunchError(f"MPI hostfile {hostfile} lists no hosts")
    forwarded = [name for name in (*exports, *_MPI_RUNTIME_VARS) if name in environ]
    forwarded += sorted(name for name in environ if name.startswith("NCCL_"))
    command = ["mpirun", "--bind-to", "none", "--map-by", "slot"]
    command += ["-x", f"MASTER_ADDR={hosts[0]}", "-x", f"MASTER_PORT={MASTER_PORT}"]
    for name in dict.fromkeys(forwarded):
        command += ["-x", name]
    return [*command, sys.executable, "-m", "safe_rlhf_v.ops.launch", "rank", "--", *stage_argv]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m safe_rlhf_v.ops.launch {rank,mpirun} [--export A,B] -- STAGE ARGV` (TrainJob pods).

    Everything after the first `--` is the stage's argv, passed on untouched (it has flags of its own).
    """
    parser = argparse.ArgumentParser(
        prog="python -m safe_rlhf_v.ops.launch", description=__doc__.splitlines()[0]
    )
    parser.add_argument("entry", choices=["rank", "mpirun"])
    parser.add_argument("--export", default="", help="comma-separated variables forwarded to MPI ranks")
    given = list(sys.argv[1:] if argv is None else argv)
    if "--" not in given:
        parser.error("separate the stage's CLI arguments with --, e.g. rank -- train-reward --out s3://...")
    split = given.index("--")
    args, stage_argv = parser.parse_args(given[:split]), given[split + 1 :]
    if args.entry == "mpirun":
        hostfile = Path(os.environ.get(MPI_HOSTFILE_ENV, "/etc/mpi/hostfile"))
        exports = [name for name in args.export.split(",") if name]
        return run_streaming(
            mpirun_command(stage_argv, hostfile=hostfile, exports=exports, environ=os.environ)
        )
    from safe_rlhf_v import cli

    os.environ.update(rank_env(os.environ))
    with tempfile.TemporaryDirectory(prefix="safe-rlhf-v-") as config_dir:
        return cli.main(rank_argv(stage_argv, os.environ, Path(config_dir)))


if __name__ == "__main__":
    sys.exit(main())
