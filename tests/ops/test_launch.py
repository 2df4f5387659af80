"""Scale-out: launch modes, the torchrun command (run for real with 2 CPU processes), the rendered
TrainJob, its submission against a fake Kubernetes API, and the entry points inside TrainJob pods."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_kfp_api import FakeKfpApi
from fake_kube_api import FakeKubeApi
from kubernetes import client as k8s

from safe_rlhf_v.config import KubernetesConfig, ResourcesConfig, Toleration
from safe_rlhf_v.ops import launch
from safe_rlhf_v.ops.launch import (
    CONFIG_ENV,
    TrainJobFailed,
    launch_mode,
    mpirun_command,
    rank_argv,
    rank_env,
    resolve_namespace,
    run_stage,
    run_streaming,
    submit_trainjob,
    torchrun_command,
    trainjob_labels,
    trainjob_manifest,
    trainjob_name,
)

WORKER = Path(__file__).with_name("rank_worker.py")
S3_ARGV = ["train-reward", "--data", "s3://bucket/run/validated", "--out", "s3://bucket/run/reward"]
GPU_NODES = ResourcesConfig(cpu="16", memory="200Gi", gpus=8, nodes=2)
KUBE = KubernetesConfig(
    env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL_S3": "http://minio:9000"},
    gpu_node_selector={"nvidia.com/gpu.product": "H100"},
    gpu_tolerations=[
        Toleration(key="nvidia.com/gpu"),
        Toleration(key="pool", operator="Equal", value="a100"),
    ],
    shm_size="32Gi",
    namespace="ml",
    trainer_runtime="torch-distributed",
)


def render(
    kube: KubernetesConfig = KUBE, resources: ResourcesConfig = GPU_NODES, **kwargs: Any
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "image": "ghcr.io/safe-rlhf-v/train:0.1.0",
        "stage_argv": S3_ARGV,
        "resources": resources,
        "kube": kube,
        "namespace": "ml",
        "config_json": '{"name": "x"}',
        "labels": {"pipeline/runid": "run-1"},
    } | kwargs
    return trainjob_manifest("train-reward-abc", **options)


def api_client(url: str) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    configuration.host = url
    return k8s.ApiClient(configuration)


def secret_ref(name: str, secret: str) -> dict[str, Any]:
    """An env entry read from key `name` of Secret `secret`: the only form credentials may take."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}


def status(kind: str, reason: str = "", message: str = "", **extra: Any) -> dict[str, Any]:
    return {"conditions": [{"type": kind, "status": "True", "reason": reason, "message": message}], **extra}


# --- launch modes and torchrun -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "nodes", "mode"),
    [(0, 1, "in-process"), (1, 1, "in-process"), (2, 1, "torchrun"), (8, 1, "torchrun"), (1, 2, "trainjob")],
)
def test_launch_mode_follows_gpus_and_nodes(gpus: int, nodes: int, mode: str) -> None:
    assert launch_mode(ResourcesConfig(gpus=gpus, nodes=nodes)) == mode


def test_torchrun_command_runs_the_stage_cli_with_one_process_per_gpu() -> None:
    argv = ["train-cost", "--config", "/tmp/c.yaml", "--data", "/in", "--out", "/out"]
    assert torchrun_command(argv, 4) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
        "-m", "safe_rlhf_v.cli", *argv,
    ]  # fmt: skip
    with pytest.raises(
        ValueError, match="torchrun needs gpus >= 2 processes, got 1: run the stage in-process"
    ):
        torchrun_command(argv, 1)


def test_run_stage_with_two_gpus_runs_two_real_ranks_under_torchrun(tmp_path: Path) -> None:
    # On CPU "gpus=2" means two gloo processes: the same launcher and process-group setup as on GPUs.
    out = io.StringIO()
    code = run_stage(
        ["--out", str(tmp_path)],
        ResourcesConfig(gpus=2),
        KubernetesConfig(),
        image="unused-in-a-pod",
        stage="train-reward",
        run_id="run-1",
        out=out,
        entry=[str(WORKER)],
    )
    assert code == 0, out.getvalue()[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["local_rank"]) for r in reports] == [(0, 2, 0), (1, 2, 1)]
    assert all(r["mean"] == 1.5 and r["backend"] == "gloo" for r in reports)  # (1 + 2) / 2 across ranks
    assert "rank 0 of 2: mean 1.5" in out.getvalue() and "rank 1 of 2: mean 1.5" in out.getvalue()


def test_run_streaming_passes_output_through_and_returns_the_exit_code() -> None:
    out = io.StringIO()
    command = [
        sys.executable,
        "-c",
        "import sys; print('step 1'); print('boom', file=sys.stderr); sys.exit(3)",
    ]
    assert run_streaming(command, out=out) == 3
    assert out.getvalue().splitlines() == ["step 1", "boom"]


def test_run_stage_refuses_stages_that_run_in_process() -> None:
    with pytest.raises(ValueError, match="train-cost with gpus=1, nodes=1 runs in-process"):
        run_stage(S3_ARGV, ResourcesConfig(gpus=1), KUBE, image="i", stage="train-cost", run_id="r")


# --- the TrainJob --------------------------------------------------------------------------------


def test_trainjob_for_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "real-secret-value-in-this-pod")
    job = render()
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"] == {
        "name": "train-reward-abc",
        "namespace": "ml",
        "labels": {"pipeline/runid": "run-1"},
    }
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["image"] == "ghcr.io/safe-rlhf-v/train:0.1.0"
    assert trainer["numProcPerNode"] == 8  # one rank per GPU, said outright
    # torchrun reads PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_* from the Trainer.
    assert trainer["command"] == ["torchrun", "-m", "safe_rlhf_v.ops.launch"]
    assert trainer["args"] == ["rank", "--", *S3_ARGV]
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"},
        "limits": {"memory": "200Gi", "nvidia.com/gpu": "8"},
    }
    assert trainer["env"] == [
        {"name": "AWS_ENDPOINT_URL_S3", "value": "http://minio:9000"},
        {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": CONFIG_ENV, "value": '{"name": "x"}'},
        secret_ref("AWS_ACCESS_KEY_ID", "safe-rlhf-v-s3"),
        secret_ref("AWS_SECRET_ACCESS_KEY", "safe-rlhf-v-s3"),
        secret_ref("MLFLOW_TRACKING_PASSWORD", "safe-rlhf-v-mlflow"),
        secret_ref("MLFLOW_TRACKING_USERNAME", "safe-rlhf-v-mlflow"),
    ]
    assert "real-secret-value-in-this-pod" not in json.dumps(job)
    (patch,) = spec["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and patch["manager"] == "safe-rlhf-v"
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}]
    assert pod["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    ]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "a100", "effect": "NoSchedule"},
    ]


@pytest.mark.parametrize(
    "runtime",
    [
        {"trainer_runtime": "safe-rlhf-v-deepspeed"},
        {"trainer_runtime": "deepspeed-distributed"},
        {"trainer_runtime": "team.deepspeed-h100", "trainer_runtime_policy": "mpi"},
    ],
)
def test_trainjob_for_deepspeed_mpi_runs_mpirun_on_the_launcher_and_patches_both_jobs(
    runtime: dict[str, str],
) -> None:
    kube = KubernetesConfig.model_validate(KUBE.model_dump() | runtime | {"mlflow_secret": None})
    job = render(kube)
    trainer = job["spec"]["trainer"]
    assert job["spec"]["runtimeRef"]["name"] == runtime["trainer_runtime"]
    assert trainer["numProcPerNode"] == 8  # the hostfile's slots per node
    assert trainer["command"] == ["python3", "-m", "safe_rlhf_v.ops.launch"]
    plain = ["AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "PYTHONUNBUFFERED", CONFIG_ENV]
    exports = ",".join([*plain, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    assert trainer["args"] == ["mpirun", "--export", exports, "--", *S3_ARGV]
    assert [e["name"] for e in trainer["env"]] == exports.split(",")  # no MLflow Secret configured
    jobs = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == ["node", "launcher"]


def test_cpu_only_trainjob_has_no_gpu_requests_or_gpu_scheduling() -> None:
    job = render(resources=ResourcesConfig(cpu="8", memory="32Gi", gpus=0, nodes=3))
    assert job["spec"]["trainer"]["resourcesPerNode"] == {
        "requests": {"cpu": "8", "memory": "32Gi"},
        "limits": {"memory": "32Gi"},
    }
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert set(pod["template"]["spec"]["template"]["spec"]) == {"volumes", "containers"}
    # Without it the torch policy's `auto` would start one rank per requested CPU: 8 here.
    assert job["spec"]["trainer"]["numProcPerNode"] == 1


def test_a_custom_runtime_names_its_policy_and_the_torch_entry_follows_it() -> None:
    kube = KubernetesConfig.model_validate(
        KUBE.model_dump() | {"trainer_runtime": "torch-h100", "trainer_runtime_policy": "torch"}
    )
    trainer = render(kube)["spec"]["trainer"]
    assert trainer["command"] == ["torchrun", "-m", "safe_rlhf_v.ops.launch"]


@pytest.mark.parametrize(
    ("runtime", "problem"),
    [
        ({"trainer_runtime": "Torch_H100"}, r"trainer_runtime 'Torch_H100' is not a DNS-1123 name"),
        ({"trainer_runtime": "torch-h100"}, r"trainer_runtime_policy must be torch or mpi for runtime"),
        (
            {"trainer_runtime": "safe-rlhf-v-deepspeed", "trainer_runtime_policy": "torch"},
            r"'torch' contradicts runtime 'safe-rlhf-v-deepspeed', whose mlPolicy is mpi",
        ),
    ],
)
def test_runtime_names_and_policies_are_validated(runtime: dict[str, str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        KubernetesConfig.model_validate(runtime)


LOCAL_DATA = ["train-reward", "--data", "/s3/bucket/validated"]
LOCAL_CONFIG = ["train-reward", "--config", "./c.yaml"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"stage_argv": LOCAL_DATA}, r"--data /s3/bucket/validated is a local path .* pass an s3:// URI"),
        (
            {"stage_argv": LOCAL_CONFIG},
            r"--config \./c\.yaml is a local path .* pass the config as config_json",
        ),
        (
            {"env": {"AWS_SECRET_ACCESS_KEY": "x"}},
            "AWS_SECRET_ACCESS_KEY must come from the Secret, not as plain",
        ),
    ],
)
def test_trainjob_rejects_what_its_pods_could_not_use(change: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        render(**change)


def test_trainjob_names_and_labels_are_valid_kubernetes_names() -> None:
    names = {trainjob_name("train-ppo-lag", "3f1e6b2a-9c0d-4e8f-a1b2-c3d4e5f60718") for _ in range(5)}
    assert len(names) == 5  # a retried task never collides with the failed job
    assert all(
        n.startswith("train-ppo-lag-3f1e6b2a-") and len(n) == len("train-ppo-lag-3f1e6b2a-") + 6
        for n in names
    )
    long_name = trainjob_name("Stage_" + "x" * 80, "RUN")
    assert len(long_name) <= 63 and long_name.startswith("stage-xxx")
    assert trainjob_name("9lives", "r").startswith("job-9lives-r-")
    assert trainjob_labels("train-cost", "abc-1")["pipeline/runid"] == "abc-1"
    with pytest.raises(ValueError, match=r"label pipeline/runid='a b' is not a valid Kubernetes label value"):
        trainjob_labels("train-cost", "a b")
    with pytest.raises(ValueError, match="must be an RFC 1035 label"):
        trainjob_manifest(
            "Bad_Name", image="i", stage_argv=[], resources=GPU_NODES, kube=KUBE, namespace="ml"
        )


def test_namespace_comes_from_the_config_or_the_pod(tmp_path: Path) -> None:
    assert resolve_namespace(KUBE) == "ml"
    sa_file = tmp_path / "namespace"
    sa_file.write_text("team-a\n")
    assert resolve_namespace(KubernetesConfig(), sa_file) == "team-a"
    with pytest.raises(
        ValueError, match=r"set kubernetes.namespace in the config \(.*missing.* is missing or empty"
    ):
        resolve_namespace(KubernetesConfig(), tmp_path / "missing")


# --- submission against a fake Kubernetes API ----------------------------------------------------


def test_submit_trainjob_creates_it_reports_progress_and_returns_on_complete() -> None:
    statuses = [
        {},
        status("Created", "JobsCreationSucceeded", "jobs created"),
        status(
            "Created", "JobsCreationSucceeded", "jobs created", jobsStatus=[{"name": "node", "active": 2}]
        ),
        status("Complete", "JobsCompleted", "all jobs succeeded"),
    ]
    manifest, out = render(), io.StringIO()
    with FakeKubeApi(statuses) as fake:
        assert (
            submit_trainjob(manifest, api_client=api_client(fake.url), poll_s=0.01, out=out)
            == "train-reward-abc"
        )
    method, path, body = fake.requests[0]
    assert (method, path) == ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs")
    assert body == manifest
    assert {(m, p) for m, p, _ in fake.requests[1:]} == {
        ("GET", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/train-reward-abc")
    }
    assert out.getvalue().splitlines() == [
        "TrainJob ml/train-reward-abc created on runtime torch-distributed",
        "TrainJob train-reward-abc: waiting for the Trainer controller",
        "TrainJob train-reward-abc: Created=True (JobsCreationSucceeded: jobs created)",
        "TrainJob train-reward-abc: Created=True (JobsCreationSucceeded: jobs created); "
        "node: 2 active, 0 succeeded, 0 failed",
        "TrainJob train-reward-abc: Complete=True (JobsCompleted: all jobs succeeded)",
    ]  # fmt: skip


def test_submit_trainjob_raises_the_controllers_failure_message() -> None:
    failed = status("Failed", "JobsFailed", "node-0 exited with code 1: CUDA out of memory")
    with FakeKubeApi([{}, failed]) as fake, pytest.raises(TrainJobFailed) as caught:
        submit_trainjob(render(), api_client=api_client(fake.url), poll_s=0.01, out=io.StringIO())
    assert str(caught.value) == (
        "TrainJob ml/train-reward-abc failed: JobsFailed: node-0 exited with code 1: CUDA out of memory"
    )


def test_submit_trainjob_reports_a_refused_create_and_deletes_a_job_that_times_out() -> None:
    with FakeKubeApi([{}]) as fake:
        fake.objects["ml/train-reward-abc"] = render()
        with pytest.raises(
            TrainJobFailed,
            match=r"cannot create TrainJob ml/train-reward-abc: HTTP 409 Conflict: .*already exists",
        ):
            submit_trainjob(render(), api_client=api_client(fake.url), poll_s=0.01, out=io.StringIO())
        del fake.objects["ml/train-reward-abc"]
        with pytest.raises(TimeoutError, match=r"did not finish within 0s; deleted it"):
            submit_trainjob(
                render(), api_client=api_client(fake.url), poll_s=0.01, timeout_s=0.0, out=io.StringIO()
            )
    assert fake.requests[-1][0] == "DELETE" and fake.objects == {}


def test_run_stage_on_two_nodes_submits_a_labelled_trainjob_and_waits() -> None:
    out = io.StringIO()
    with FakeKubeApi([status("Complete", "JobsCompleted", "done")]) as fake:
        code = run_stage(
            S3_ARGV,
            GPU_NODES,
            KUBE,
            image="ghcr.io/safe-rlhf-v/train:0.1.0",
            stage="train-reward",
            run_id="0a1b2c3d-run",
            config_json='{"name": "x"}',
            api_client=api_client(fake.url),
            poll_s=0.01,
            out=out,
        )
    assert code == 0
    (job,) = fake.objects.values()
    assert job["metadata"]["name"].startswith("train-reward-0a1b2c3d-")
    assert job["metadata"]["labels"] == {
        "app.kubernetes.io/part-of": "safe-rlhf-v",
        "safe-rlhf-v/stage": "train-reward",
        "pipeline/runid": "0a1b2c3d-run",
    }
    assert {"name": CONFIG_ENV, "value": '{"name": "x"}'} in job["spec"]["trainer"]["env"]


# --- entry points inside TrainJob pods -----------------------------------------------------------


def test_rank_env_maps_openmpi_ranks_to_torch_variables() -> None:
    ompi = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    master = {"MASTER_ADDR": "job-node-0-0.job", "MASTER_PORT": "29500"}
    assert rank_env(ompi | master) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert rank_env({"RANK": "0", **ompi, **master}) == {}  # torchrun already set them
    assert rank_env({}) == {}
    with pytest.raises(RuntimeError, match="MPI rank without MASTER_ADDR, MASTER_PORT"):
        rank_env(ompi)


def test_rank_argv_writes_the_config_from_the_environment(tmp_path: Path) -> None:
    argv = rank_argv(S3_ARGV, {CONFIG_ENV: '{"name": "from-env"}'}, tmp_path)
    assert argv == [*S3_ARGV, "--config", str(tmp_path / "config.json")]
    assert json.loads((tmp_path / "config.json").read_text()) == {"name": "from-env"}
    assert rank_argv(S3_ARGV, {}, tmp_path) == S3_ARGV
    with pytest.raises(ValueError, match=f"both --config and {CONFIG_ENV} are set"):
        rank_argv([*S3_ARGV, "--config", "c.yaml"], {CONFIG_ENV: "{}"}, tmp_path)


def test_mpirun_command_rendezvouses_at_the_first_hostfile_host(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-node-0-0.job.ml.svc slots=8\njob-launcher-0-0.job.ml.svc slots=8\n")
    environ = {
        "AWS_ACCESS_KEY_ID": "k",
        "PATH": "/opt/venv/bin:/usr/bin",
        "NCCL_IB_DISABLE": "1",
        "HOME": "/h",
    }
    command = mpirun_command(
        S3_ARGV, hostfile=hostfile, exports=["AWS_ACCESS_KEY_ID", "UNSET"], environ=environ
    )
    assert command == [
        "mpirun", "--bind-to", "none", "--map-by", "slot",
        "-x", "MASTER_ADDR=job-node-0-0.job.ml.svc", "-x", "MASTER_PORT=29500",
        "-x", "AWS_ACCESS_KEY_ID", "-x", "PATH", "-x", "NCCL_IB_DISABLE",
        sys.executable, "-m", "safe_rlhf_v.ops.launch", "rank", "--", *S3_ARGV,
    ]  # fmt: skip
    assert "k" not in command  # values travel with -x NAME, never in argv
    with pytest.raises(FileNotFoundError, match=r"MPI hostfile .*nohost is missing"):
        mpirun_command(S3_ARGV, hostfile=tmp_path / "nohost", exports=[], environ={})


def test_mpirun_entry_keeps_the_stage_argv_apart_from_its_own_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("job-node-0-0.job slots=2\n")
    monkeypatch.setenv("OMPI_MCA_orte_default_hostfile", str(hostfile))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    started: list[list[str]] = []
    monkeypatch.setattr(launch, "run_streaming", lambda command, **_: started.append(command) or 0)
    stage = ["train-reward", "--export", "not-ours", "--out", "s3://b/o"]
    assert launch.main(["mpirun", "--export", "AWS_ACCESS_KEY_ID", "--", *stage]) == 0
    (command,) = started
    assert command[command.index("rank") :] == ["rank", "--", *stage]
    assert "AWS_ACCESS_KEY_ID" in command and "-x" in command
    with pytest.raises(SystemExit):
        launch.main(["rank", "train-reward"])


def test_rank_entry_runs_the_package_cli_with_the_config_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `submit` is a cheap CLI command that reads --config: the pipeline name it asks the (fake)
    # KFP API for can only come from the config the TrainJob put in the environment.
    monkeypatch.setenv(
        CONFIG_ENV, json.dumps({"name": "from-env-config", "data": {"uri": "d"}, "base_model": "m"})
    )
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    with FakeKfpApi() as fake:
        assert launch.main(["rank", "--", "submit", "--host", fake.url]) == 2
    (lookup,) = fake.calls("GET", "/pipelines")
    assert json.loads(lookup.query["filter"])["predicates"][0]["stringValue"] == "from-env-config"
    assert "no pipeline named from-env-config" in capsys.readouterr().err
