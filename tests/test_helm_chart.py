"""The Helm chart (helm/rmserve): the distributed deployment renders, lints, validates against the
Kubernetes API schemas, and wires registry, workers, sandbox, probes, security, NetworkPolicy,
KEDA and monitoring right.

Rendered and linted with the Helm engine itself, from PyPI (helm-python-sdk, module
helm_python), so no helm binary is needed. Values go through the same coalescing as
`helm install -f FILE`: the chart's values.yaml, then the user's values on top. Every rendered
object is validated offline: built-in kinds with kubernetes-validate (the OpenAPI schemas of
Kubernetes itself, strict: unknown fields are errors), the CRD kinds (ServiceMonitor,
ScaledObject, TriggerAuthentication) against their CRDs' openAPIV3Schema vendored in
tests/k8s_schemas/.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from rmserve.models.spec import load_registry

CHART = Path(__file__).resolve().parents[1] / "helm" / "rmserve"
RELEASE = "rm"
NAMESPACE = "rmserve-test"
FULLNAME = "rm-rmserve"
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate 1.37.0 ships
CRD_SCHEMAS = Path(__file__).resolve().parent / "k8s_schemas"
# The docker compose Prometheus configuration, whose target labels the ServiceMonitors reproduce.
COMPOSE_PROMETHEUS = Path(__file__).resolve().parents[1] / "deploy" / "prometheus.yml"
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda.sh-v1alpha1.json",
}
PROBE_PATHS = {
    "startupProbe": "/startupz",
    "livenessProbe": "/healthz",
    "readinessProbe": "/readyz",
}

# A second values file, as a user would pass with `helm install -f`: it adds models to the
# registry map of the chart's values.yaml (one with local weights named through ${VAR}), with
# Kubernetes settings under `deploy:`.
EXTRA_VALUES = r"""
models:
  qwen-math-prm:
    kind: process
    weights: Qwen/Qwen2.5-Math-PRM-7B
    engine: {max_model_len: 4096, dtype: bfloat16, trust_remote_code: true}
    options: {steps: separator, separator: "\n\n", step_tag: "<extra_0>", aggregate: min}
    deploy:
      replicas: 2
      gpu: {resource: amd.com/gpu, count: 2}
      nodeSelector: {node.kubernetes.io/instance-type: mi300x}
      tolerations: [{key: amd.com/gpu, operator: Exists, effect: NoSchedule}]
      shmSize: 16Gi
      cache: {existingClaim: hf-cache}
      startupFailureThreshold: 360
  local-rm:
    kind: discriminative
    weights: ${RMSERVE_TEST_WEIGHTS}/local-rm
    engine: {max_model_len: 256, dtype: float32}
    deploy: {strategy: {type: Recreate}}
  math:
    kind: math
    deploy: {sandbox: {enabled: false}}
  unit-tests:
    kind: code_tests
    deploy: {runtimeClassName: gvisor}
  remote-judge:
    kind: generative
    remote: {base_url: "https://judge.example.com/v1", model: judge}
"""

# One value set per deployment shape (values files, merged in order); every one must render,
# lint and validate.
VALUE_SETS: dict[str, tuple[str, ...]] = {
    "defaults": ("{}",),
    "several models": (EXTRA_VALUES,),
    "keda": ("keda: {enabled: true}",),
    "keda with in-chart redis": ("keda: {enabled: true}", "redis: {internal: {enabled: true}}"),
    "service monitor": ("serviceMonitor: {enabled: true, labels: {release: prometheus}}",),
    "external redis": (
        """
redis: {existingSecret: queue, key: url}
networkPolicy: {redisCidrs: [10.20.0.0/16], redisPorts: [6380]}
""",
    ),
    "in-chart redis": ("redis: {internal: {enabled: true, persistence: {enabled: true}}}",),
    "redis behind sentinel": (
        """
redis:
  existingSecret: ""
  sentinel:
    hosts: ["a:26379", "b:26380"]
    service: queue-primary
    passwordSecret: {name: sentinel-auth, key: password}
  waitReplicas: 1
  waitTimeoutS: 0.5
  timeoutS: 3
networkPolicy: {redisCidrs: [10.30.0.0/16]}
""",
    ),
    "ingress": (
        """
gateway:
  ingress:
    enabled: true
    className: nginx
    hosts: [{host: rm.example.com}]
    tls: [{secretName: rm-tls, hosts: [rm.example.com]}]
""",
    ),
    "gvisor": ("workerDefaults: {runtimeClassName: gvisor}",),
    "auth off": ("gateway: {auth: {enabled: false}}",),
    "everything": (
        EXTRA_VALUES,
        """
keda: {enabled: true, redis: {existingSecret: keda-redis, usernameKey: redis-user}}
serviceMonitor: {enabled: true}
hfToken: {existingSecret: hf}
gateway:
  auth: {existingSecret: rm-api-keys, key: keys}
  sandbox: {enabled: true}
  autoscaling: {enabled: false}
  podDisruptionBudget: {maxUnavailable: 25%}
  ingress: {enabled: true, hosts: [{host: rm.example.com, paths: [{path: /v1}]}]}
sandbox:
  seccompProfile: {type: Localhost, localhostProfile: profiles/rmserve-sandbox.json}
  appArmorProfile: {type: Localhost, localhostProfile: rmserve-sandbox}
networkPolicy:
  dnsTo: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]
  gatewayIngressFrom: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ingress}}}]
  workerExtraEgress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}], ports: [{protocol: TCP, port: 9000}]}]
  sandboxMetricsFrom:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: observability}}
      podSelector: {matchLabels: {app.kubernetes.io/name: prometheus}}
""",
    ),
}

Manifests = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def values(*texts: str) -> dict[str, Any]:
    """User values from YAML; several texts merge like several `-f` files (later ones win)."""
    merged: dict[str, Any] = {}
    for text in texts:
        merge_into(merged, helm.values_from_yaml(text))
    return merged


def merge_into(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value


def render_raw(chart: helm.Chart, user_values: dict[str, Any] | None = None) -> dict[str, str]:
    return chart.render(user_values or {}, name=RELEASE, namespace=NAMESPACE)


def render(chart: helm.Chart, user_values: dict[str, Any] | None = None) -> Manifests:
    """Rendered objects by kind."""
    by_kind: Manifests = {}
    for path, text in render_raw(chart, user_values).items():
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def objects(manifests: Manifests) -> list[dict[str, Any]]:
    return [obj for kind in sorted(manifests) for obj in manifests[kind]]


def one(manifests: Manifests, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in manifests.get(kind, []) if name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def model_of(deployment: dict[str, Any]) -> str | None:
    name: str | None = deployment["metadata"].get("annotations", {}).get("rmserve.io/model-name")
    return name


def worker(manifests: Manifests, model: str) -> dict[str, Any]:
    """The worker Deployment of `model`."""
    (deployment,) = [d for d in manifests["Deployment"] if model_of(d) == model]
    return deployment


def gateway(manifests: Manifests) -> dict[str, Any]:
    return one(manifests, "Deployment", f"{FULLNAME}-gateway")


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod(workload)["containers"] if c["name"] == name]
    return found


def env(main: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in main.get("env", [])}


def workloads(manifests: Manifests) -> list[dict[str, Any]]:
    return manifests.get("Deployment", []) + manifests.get("StatefulSet", [])


def registry_text(manifests: Manifests) -> str:
    text: str = one(manifests, "ConfigMap")["data"]["registry.yaml"]
    return text


@cache
def rendered(chart: helm.Chart, value_set: str) -> Manifests:
    return render(chart, values(*VALUE_SETS[value_set]))


# -- every value set: render, lint, validate --------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_value_set_lints_clean(value_set: str) -> None:
    report = helm.lint(CHART, values(*VALUE_SETS[value_set]), strict=True, namespace=NAMESPACE)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def closed(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as the API server does with strict field
    validation (kubectl's default); CRD schemas leave additionalProperties open."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [closed(item) for item in schema]
    return schema


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((CRD_SCHEMAS / CRDS[api_version, kind]).read_text())
    return jsonschema.Draft7Validator(closed(schema))


def validate(obj: dict[str, Any]) -> None:
    """Raises when `obj` is not a valid object of its kind (offline)."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRDS:
        crd_validator(*key).validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_matches_its_kubernetes_schema(chart: helm.Chart, value_set: str) -> None:
    manifests = rendered(chart, value_set)
    assert objects(manifests)
    for obj in objects(manifests):
        try:
            validate(obj)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as exc:
            where = ".".join(map(str, exc.path))
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}")


def test_schema_validation_catches_mistakes(chart: helm.Chart) -> None:
    # The validation above is only worth something if it refuses a misspelt field.
    manifests = rendered(chart, "everything")
    deployment = copy.deepcopy(gateway(manifests))
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    for kind in ("ScaledObject", "TriggerAuthentication", "ServiceMonitor"):
        broken = copy.deepcopy(manifests[kind][0])
        broken["spec"]["minReplicas"] = 1
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)


def test_crd_schemas_are_vendored_with_their_source() -> None:
    readme = (CRD_SCHEMAS / "README.md").read_text()
    for name in CRDS.values():
        assert name in readme
        assert json.loads((CRD_SCHEMAS / name).read_text())["type"] == "object"


# -- the registry ------------------------------------------------------------------------------


def test_registry_configmap_holds_every_model_without_deploy_settings(
    chart: helm.Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = render(chart, values(EXTRA_VALUES))
    text = registry_text(manifests)
    assert "deploy" not in yaml.safe_load(text)["models"]["qwen-math-prm"]
    assert "deploy:" not in text

    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(text)
    weights = tmp_path / "weights"
    monkeypatch.setenv("RMSERVE_TEST_WEIGHTS", str(weights))
    registry = load_registry(registry_file)  # hub ids load offline: nothing is fetched

    # The chart's default model and the added ones: the map merged, nothing was replaced.
    assert set(registry.models) == {
        "skywork-rm",
        "qwen-math-prm",
        "local-rm",
        "math",
        "unit-tests",
        "remote-judge",
    }
    prm = registry.models["qwen-math-prm"]
    assert prm.kind == "process"
    assert prm.options.separator == "\n\n"  # survives toYaml inside the ConfigMap
    assert prm.options.step_tag == "<extra_0>"
    assert prm.engine.trust_remote_code is True
    assert registry.models["local-rm"].weights == str(weights / "local-rm")
    assert registry.models["skywork-rm"].weights == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"


def test_null_removes_a_default_model(chart: helm.Chart, tmp_path: Path) -> None:
    manifests = render(
        chart,
        values("models:\n  skywork-rm: null\n  other-rm: {kind: discriminative, weights: o/r}\n"),
    )
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(registry_text(manifests))
    assert set(load_registry(registry_file).models) == {"other-rm"}
    assert [d["metadata"]["name"] for d in manifests["Deployment"]] == [
        f"{FULLNAME}-gateway",
        f"{FULLNAME}-other-rm",
    ]


def test_registry_change_rolls_the_pods(chart: helm.Chart) -> None:
    def checksums(user_values: dict[str, Any] | None) -> set[str]:
        return {
            d["spec"]["template"]["metadata"]["annotations"]["checksum/registry"]
            for d in render(chart, user_values)["Deployment"]
        }

    (default,) = checksums(None)  # the gateway and every worker read the same registry
    configmap = render_raw(chart)["rmserve/templates/configmap.yaml"]
    assert default == hashlib.sha256(configmap.encode()).hexdigest()
    assert checksums(values(EXTRA_VALUES)) != {default}
    # Kubernetes-only settings are not in the registry: they do not roll every pod.
    assert checksums({"models": {"skywork-rm": {"deploy": {"replicas": 3}}}}) == {default}
    assert checksums({"gateway": {"replicas": 3}}) == {default}


def test_pods_mount_the_registry_configmap(chart: helm.Chart) -> None:
    manifests = rendered(chart, "several models")
    configmap = one(manifests, "ConfigMap")
    for main in [container(gateway(manifests), "gateway")] + [
        container(worker(manifests, m), "worker") for m in ("skywork-rm", "math")
    ]:
        args = main["args"]
        registry = Path(args[args.index("--registry") + 1])
        mount = next(m for m in main["volumeMounts"] if m["mountPath"] == str(registry.parent))
        deployment = next(d for d in manifests["Deployment"] if main in pod(d)["containers"])
        volume = next(v for v in pod(deployment)["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == configmap["metadata"]["name"]
        assert registry.name in configmap["data"]
        assert mount.get("readOnly") is True


# -- workers -----------------------------------------------------------------------------------


def test_each_model_gets_its_own_worker_deployment(chart: helm.Chart) -> None:
    manifests = rendered(chart, "several models")
    models = {"skywork-rm", "qwen-math-prm", "local-rm", "math", "unit-tests", "remote-judge"}
    workers = [d for d in manifests["Deployment"] if d["metadata"]["name"] != f"{FULLNAME}-gateway"]
    assert {d["metadata"]["annotations"]["rmserve.io/model-name"] for d in workers} == models
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items())) for d in workers]
    assert len(set(selectors)) == len(workers), "worker Deployments must not share pods"

    for model in models:
        deployment = worker(manifests, model)
        main = container(deployment, "worker")
        assert main["image"] == f"rmserve:{chart.metadata['appVersion']}"
        assert main["command"] == ["rmserve"]
        assert main["args"][:3] == ["worker", "--model", model]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= (
            deployment["spec"]["template"]["metadata"]["labels"].items()
        )


def test_worker_gpu_scheduling_and_volumes_come_from_values(chart: helm.Chart) -> None:
    manifests = rendered(chart, "several models")

    prm = worker(manifests, "qwen-math-prm")
    limits = container(prm, "worker")["resources"]["limits"]
    assert limits["amd.com/gpu"] == 2
    assert "nvidia.com/gpu" not in limits
    assert limits["memory"] == "32Gi"  # merged with, not replacing, the default limits
    assert prm["spec"]["replicas"] == 2
    assert pod(prm)["nodeSelector"] == {"node.kubernetes.io/instance-type": "mi300x"}
    assert pod(prm)["tolerations"] == [
        {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    volumes = {v["name"]: v for v in pod(prm)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container(prm, "worker")["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert mounts["/models/hf"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}
    assert env(container(prm, "worker"))["HF_HOME"] == "/models/hf"
    startup = container(prm, "worker")["startupProbe"]
    assert startup["failureThreshold"] == 360

    # A model's deploy.strategy replaces the default strategy's type and drops its rollingUpdate.
    assert worker(manifests, "local-rm")["spec"]["strategy"] == {"type": "Recreate"}

    # The chart's defaults: one NVIDIA GPU for a model with weights, an emptyDir cache, a rollout
    # that starts the new pod before stopping the old one.
    default = worker(manifests, "skywork-rm")
    assert default["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert container(default, "worker")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "persistentVolumeClaim" not in str(pod(default)["volumes"])
    assert "nodeSelector" not in pod(default)

    # Verifiers and remote judges have no weights: no GPU, lighter resources.
    for model in ("math", "unit-tests", "remote-judge"):
        resources = container(worker(manifests, model), "worker")["resources"]
        assert not any("gpu" in name for name in resources.get("limits", {})), model
        assert resources["requests"]["memory"] == "1Gi"


def test_gpu_node_selector_and_tolerations_apply_to_gpu_workers_only(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        values("""
workerDefaults:
  gpu:
    nodeSelector: {accelerator: h100}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  tolerations: [{key: team, operator: Equal, value: rl, effect: NoSchedule}]
models:
  math: {kind: math}
  cpu-rm: {kind: discriminative, weights: org/rm, deploy: {gpu: {count: 0}}}
"""),
    )
    gpu_pod = pod(worker(manifests, "skywork-rm"))
    assert gpu_pod["nodeSelector"] == {"accelerator": "h100"}
    assert [t["key"] for t in gpu_pod["tolerations"]] == ["nvidia.com/gpu", "team"]
    for model in ("math", "cpu-rm"):
        cpu_pod = pod(worker(manifests, model))
        assert "nodeSelector" not in cpu_pod
        assert [t["key"] for t in cpu_pod["tolerations"]] == ["team"]
        assert "nvidia.com/gpu" not in str(cpu_pod["containers"][0]["resources"])


def test_worker_environment(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        values("""
env: {RMSERVE_MAX_ITEMS_PER_REQUEST: 2048}
hfToken: {existingSecret: hf, key: token}
models: {skywork-rm: {deploy: {env: {VLLM_LOGGING_LEVEL: DEBUG}}}}
"""),
    )
    main = env(container(worker(manifests, "skywork-rm"), "worker"))
    assert main["RMSERVE_MAX_ITEMS_PER_REQUEST"] == "2048"  # strings, as Kubernetes requires
    assert main["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert main["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert main["RMSERVE_REDIS_URL"] == {
        "secretKeyRef": {"name": "rmserve-redis", "key": "redis-url"}
    }
    assert main["RMSERVE_SANDBOX_URL"] == "http://127.0.0.1:8002"
    assert main["RMSERVE_LOG_JSON"] == "true"
    assert "HF_TOKEN" not in env(
        container(worker(rendered(chart, "defaults"), "skywork-rm"), "worker")
    )


def test_scheduling_and_usage_retention_reach_gateway_and_workers(chart: helm.Chart) -> None:
    defaults = rendered(chart, "defaults")
    for main in (
        container(gateway(defaults), "gateway"),
        container(worker(defaults, "skywork-rm"), "worker"),
    ):
        assert env(main)["RMSERVE_SCHEDULING"] == "fair"
        assert env(main)["RMSERVE_USAGE_RETENTION_DAYS"] == "90"
    manifests = render(chart, values("scheduling: fifo\nusageRetentionDays: 30"))
    for main in (
        container(gateway(manifests), "gateway"),
        container(worker(manifests, "skywork-rm"), "worker"),
    ):
        assert env(main)["RMSERVE_SCHEDULING"] == "fifo"
        assert env(main)["RMSERVE_USAGE_RETENTION_DAYS"] == "30"
    for wrong in ("scheduling: lifo", "usageRetentionDays: 0"):
        with pytest.raises(helm.HelmError):
            render(chart, values(wrong))


def test_model_names_that_collide_in_kubernetes_are_refused(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r'"a\.b" and "a_b"|"a_b" and "a\.b"'):
        render(chart, {"models": {"a.b": {"kind": "math"}, "a_b": {"kind": "math"}}})
    manifests = render(chart, {"models": {"Judge_V2.1": {"kind": "math"}}})
    assert worker(manifests, "Judge_V2.1")["metadata"]["name"] == f"{FULLNAME}-judge-v2-1"
    assert container(worker(manifests, "Judge_V2.1"), "worker")["args"][2] == "Judge_V2.1"


# -- security ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ["defaults", "everything", "in-chart redis"])
def test_every_container_is_locked_down(chart: helm.Chart, value_set: str) -> None:
    manifests = rendered(chart, value_set)
    for workload in workloads(manifests):
        spec = pod(workload)
        name = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        assert all("hostPath" not in v for v in spec["volumes"]), name
        for main in spec.get("initContainers", []) + spec["containers"]:
            security = main["securityContext"]
            where = f"{name}/{main['name']}"
            assert security["runAsNonRoot"] is True, where
            assert security.get("runAsUser", spec["securityContext"]["runAsUser"]) != 0, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert not security["capabilities"].get("add"), where
            assert not security.get("privileged"), where
            # With a read-only root, /tmp is a volume.
            assert "/tmp" in {m["mountPath"] for m in main["volumeMounts"]}, where
    for account in manifests.get("ServiceAccount", []):
        assert account["automountServiceAccountToken"] is False


def test_sandbox_sidecar_runs_beside_every_worker(chart: helm.Chart) -> None:
    manifests = rendered(chart, "several models")
    for deployment in manifests["Deployment"]:
        model = deployment["metadata"].get("annotations", {}).get("rmserve.io/model-name")
        names = [c["name"] for c in pod(deployment)["containers"]]
        if model is None:  # the gateway: no sandbox unless gateway.sandbox.enabled
            assert names == ["gateway"]
        elif model == "math":  # deploy.sandbox.enabled: false
            assert names == ["worker"]
            assert "RMSERVE_SANDBOX_URL" not in env(container(deployment, "worker"))
        else:
            assert names == ["worker", "sandbox"], model

    deployment = worker(manifests, "unit-tests")
    sandbox = container(deployment, "sandbox")
    # All of the pod's addresses (kubelet probes, Prometheus); the worker still uses loopback.
    assert sandbox["args"] == ["sandbox", "--host", "0.0.0.0", "--port", "8002"]
    assert sandbox["ports"] == [{"name": "sandbox", "containerPort": 8002, "protocol": "TCP"}]
    assert env(sandbox)["RMSERVE_SANDBOX_MOUNT_PROC"] == "false"
    assert env(container(deployment, "worker"))["RMSERVE_SANDBOX_URL"] == "http://127.0.0.1:8002"
    # bubblewrap needs user namespaces: only the sandbox leaves the runtime's default profiles.
    assert sandbox["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    assert sandbox["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
    assert "seccompProfile" not in container(deployment, "worker")["securityContext"]
    assert pod(deployment)["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod(deployment)["volumes"]}
    (tmp,) = sandbox["volumeMounts"]
    assert "emptyDir" in volumes[tmp["name"]]
    assert tmp["name"] not in {m["name"] for m in container(deployment, "worker")["volumeMounts"]}

    hardened = container(worker(rendered(chart, "everything"), "unit-tests"), "sandbox")
    assert hardened["securityContext"]["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "profiles/rmserve-sandbox.json",
    }
    assert hardened["securityContext"]["appArmorProfile"]["type"] == "Localhost"
    inherited = render(chart, values("sandbox: {seccompProfile: null, appArmorProfile: null}"))
    security = container(worker(inherited, "skywork-rm"), "sandbox")["securityContext"]
    assert "seccompProfile" not in security  # the pod's RuntimeDefault applies
    assert "appArmorProfile" not in security


def test_runtime_class_name_when_given(chart: helm.Chart) -> None:
    assert "runtimeClassName" not in pod(worker(rendered(chart, "defaults"), "skywork-rm"))
    assert pod(worker(rendered(chart, "gvisor"), "skywork-rm"))["runtimeClassName"] == "gvisor"

    manifests = rendered(chart, "several models")  # only the code_tests verifier asks for it
    assert pod(worker(manifests, "unit-tests"))["runtimeClassName"] == "gvisor"
    assert "runtimeClassName" not in pod(worker(manifests, "skywork-rm"))
    assert "runtimeClassName" not in pod(gateway(manifests))


def test_gateway_sandbox_for_python_graders(chart: helm.Chart) -> None:
    deployment = gateway(rendered(chart, "everything"))
    assert [c["name"] for c in pod(deployment)["containers"]] == ["gateway", "sandbox"]
    main = env(container(deployment, "gateway"))
    assert main["RMSERVE_SANDBOX_URL"] == "http://127.0.0.1:8002"
    assert main["RMSERVE_API_KEYS_FILE"] == "/etc/rmserve-auth/keys.yaml"


def keys_file_source(deployment: dict[str, Any]) -> dict[str, Any]:
    """The Secret volume the gateway's RMSERVE_API_KEYS_FILE is in, checked to be mounted
    read-only at the variable's directory, with the file named as the variable says."""
    main = container(deployment, "gateway")
    path = Path(env(main)["RMSERVE_API_KEYS_FILE"])
    (mount,) = [m for m in main["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod(deployment)["volumes"] if v["name"] == mount["name"]]
    (item,) = volume["secret"]["items"]
    assert item["path"] == path.name
    return {"secretName": volume["secret"]["secretName"], "key": item["key"]}


def test_api_keys_are_on_by_default_from_a_mounted_secret(chart: helm.Chart) -> None:
    assert keys_file_source(gateway(rendered(chart, "defaults"))) == {
        "secretName": "rmserve-api-keys",
        "key": "keys.yaml",
    }
    assert keys_file_source(gateway(rendered(chart, "everything"))) == {
        "secretName": "rm-api-keys",
        "key": "keys",
    }
    notes = render_raw(chart)["rmserve/templates/NOTES.txt"]
    assert "API keys are on" in notes and "rmserve api-key" in notes
    assert "--from-file=keys.yaml=keys.yaml" in notes
    # Workers take jobs from Redis and serve no API: no keys there.
    manifests = rendered(chart, "everything")
    for deployment in manifests["Deployment"]:
        if deployment is not gateway(manifests):
            assert not any("RMSERVE_API_KEYS_FILE" in env(c) for c in pod(deployment)["containers"])
            assert "api-keys" not in {v["name"] for v in pod(deployment)["volumes"]}


def test_api_keys_are_off_only_when_disabled(chart: helm.Chart) -> None:
    deployment = gateway(rendered(chart, "auth off"))
    assert "RMSERVE_API_KEYS_FILE" not in env(container(deployment, "gateway"))
    assert not [v for v in pod(deployment)["volumes"] if "secret" in v]
    notes = render_raw(chart, values(*VALUE_SETS["auth off"]))["rmserve/templates/NOTES.txt"]
    assert "WARNING: API keys are off" in notes
    assert "API keys are off" not in render_raw(chart)["rmserve/templates/NOTES.txt"]
    with pytest.raises(helm.HelmRenderError, match=r"gateway\.auth\.existingSecret is empty"):
        render(chart, values("gateway: {auth: {existingSecret: ''}}"))


# -- probes ------------------------------------------------------------------------------------


def probe_target(probe: dict[str, Any], main: dict[str, Any]) -> str:
    """The path a probe checks: always an HTTP GET on a named port of the container itself."""
    assert set(probe) & {"httpGet", "exec", "tcpSocket", "grpc"} == {"httpGet"}, main["name"]
    assert probe["httpGet"]["port"] in {p["name"] for p in main["ports"]}, main["name"]
    path: str = probe["httpGet"]["path"]
    return path


def test_probes_use_three_distinct_paths_in_every_container(chart: helm.Chart) -> None:
    manifests = rendered(chart, "everything")
    checked = set()
    for deployment in manifests["Deployment"]:
        for main in pod(deployment)["containers"]:
            targets = {kind: probe_target(main[kind], main) for kind in PROBE_PATHS}
            assert targets == PROBE_PATHS, main["name"]
            checked.add(main["name"])
    assert checked == {"gateway", "worker", "sandbox"}

    # The sandbox's own: the kubelet's HTTP GETs on its named port, on three distinct paths.
    for deployment in (worker(manifests, "unit-tests"), gateway(manifests)):
        sandbox = container(deployment, "sandbox")
        gets = {kind: sandbox[kind]["httpGet"] for kind in PROBE_PATHS}
        assert {kind: get["path"] for kind, get in gets.items()} == PROBE_PATHS
        assert len({get["path"] for get in gets.values()}) == 3
        assert {get["port"] for get in gets.values()} == {"sandbox"}
        assert not any("exec" in sandbox[kind] for kind in PROBE_PATHS)

    # Loading a model takes minutes: the worker's startup probe waits long enough before the
    # liveness probe applies (30 minutes by default, per model in deploy.startupFailureThreshold).
    startup = container(worker(manifests, "skywork-rm"), "worker")["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 1800
    startup = container(gateway(manifests), "gateway")["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] < 1800


# -- network policy ----------------------------------------------------------------------------


def policy(manifests: Manifests, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "NetworkPolicy", name)["spec"]
    return spec


def ports(rules: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(p["protocol"], p["port"]) for rule in rules for p in rule.get("ports", [])}


def selects(selector: dict[str, Any], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return bool(selector["matchLabels"].items() <= labels.items())


def test_network_policy_isolates_workers_and_their_sandbox(chart: helm.Chart) -> None:
    manifests = rendered(chart, "defaults")
    workers = policy(manifests, f"{FULLNAME}-workers")
    assert selects(workers["podSelector"], worker(manifests, "skywork-rm"))
    assert not selects(workers["podSelector"], gateway(manifests))
    assert set(workers["policyTypes"]) == {"Ingress", "Egress"}
    # In: the worker's health and metrics, and the sandbox's port (from some peers only, below).
    # Every rule names its ports: a rule without ports would admit every port, the sandbox's too.
    assert all(rule.get("ports") for rule in workers["ingress"])
    assert ports(workers["ingress"]) == {("TCP", 8001), ("TCP", 8002)}
    # Out: DNS, Redis and HTTPS (model hub). Every rule names its ports: no open egress.
    assert all(rule.get("ports") for rule in workers["egress"])
    assert ports(workers["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 6379), ("TCP", 443)}

    gateway_policy = policy(manifests, f"{FULLNAME}-gateway")
    assert selects(gateway_policy["podSelector"], gateway(manifests))
    assert ports(gateway_policy["ingress"]) == {("TCP", 8000)}
    assert ports(gateway_policy["egress"]) == {("UDP", 53), ("TCP", 53), ("TCP", 6379)}


MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def admitting(spec: dict[str, Any], port: int) -> list[dict[str, Any]]:
    """The ingress rules of a policy spec that admit TCP `port` (a rule without ports admits
    every port)."""
    rules: list[dict[str, Any]] = spec.get("ingress", [])
    return [r for r in rules if "ports" not in r or ("TCP", port) in ports([r])]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_sandbox_port_is_admitted_only_from_the_configured_peers(
    chart: helm.Chart, value_set: str
) -> None:
    manifests = rendered(chart, value_set)
    configured = (
        values(*VALUE_SETS[value_set])
        .get("networkPolicy", {})
        .get("sandboxMetricsFrom", MONITORING)
    )
    assert configured  # every value set keeps a peer: the sandbox is scraped
    for policy_object in manifests["NetworkPolicy"]:
        name = policy_object["metadata"]["name"]
        rules = admitting(policy_object["spec"], 8002)
        if name != f"{FULLNAME}-workers":
            # Not the gateway's (even with gateway.sandbox.enabled), Redis's or a model's extra.
            assert rules == [], name
            continue
        (rule,) = rules
        assert rule["ports"] == [{"protocol": "TCP", "port": 8002}]  # not with the 8001 peers
        assert rule["from"] == configured
        # The worker's health and metrics port stays as it was: anyone, unless workerIngressFrom.
        (health,) = admitting(policy_object["spec"], 8001)
        assert health["ports"] == [{"protocol": "TCP", "port": 8001}]
        assert "from" not in health


def test_sandbox_peers_port_and_closing_it(chart: helm.Chart) -> None:
    # The default is the namespace Kubernetes labels "monitoring", where Prometheus runs.
    workers = policy(rendered(chart, "defaults"), f"{FULLNAME}-workers")
    assert admitting(workers, 8002)[0]["from"] == MONITORING

    # Another port moves the container, the Service, the policy and the worker's URL together.
    moved = render(chart, values("sandbox: {port: 9102}"))
    deployment = worker(moved, "skywork-rm")
    assert container(deployment, "sandbox")["ports"][0]["containerPort"] == 9102
    assert env(container(deployment, "worker"))["RMSERVE_SANDBOX_URL"] == "http://127.0.0.1:9102"
    service_ports = one(moved, "Service", f"{FULLNAME}-workers")["spec"]["ports"]
    assert {"name": "sandbox", "port": 9102, "targetPort": "sandbox", "protocol": "TCP"} in (
        service_ports
    )
    workers = policy(moved, f"{FULLNAME}-workers")
    assert admitting(workers, 8002) == []
    assert admitting(workers, 9102)[0]["from"] == MONITORING

    # No peers: the port stays closed (never an empty `from`, which would admit everyone).
    closed_port = render(chart, values("networkPolicy: {sandboxMetricsFrom: []}"))
    workers = policy(closed_port, f"{FULLNAME}-workers")
    assert admitting(workers, 8002) == []
    assert ports(workers["ingress"]) == {("TCP", 8001)}
    notes = render_raw(chart, values("networkPolicy: {sandboxMetricsFrom: []}"))
    assert "sandboxMetricsFrom is empty" in notes["rmserve/templates/NOTES.txt"]
    assert "sandboxMetricsFrom is empty" not in render_raw(chart)["rmserve/templates/NOTES.txt"]
    for obj in objects(closed_port):
        validate(obj)


def test_sandbox_port_must_not_take_the_worker_or_gateway_port(chart: helm.Chart) -> None:
    for taken in (8000, 8001):
        with pytest.raises(helm.HelmRenderError, match=f"sandbox.port: {taken}"):
            render(chart, values(f"sandbox: {{port: {taken}}}"))


def test_network_policy_egress_follows_redis_and_model_hub_settings(chart: helm.Chart) -> None:
    external = policy(rendered(chart, "external redis"), f"{FULLNAME}-workers")["egress"]
    (redis_rule,) = [r for r in external if ("TCP", 6380) in ports([r])]
    assert redis_rule["to"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]

    manifests = rendered(chart, "in-chart redis")
    redis = one(manifests, "StatefulSet")
    internal = policy(manifests, f"{FULLNAME}-workers")["egress"]
    (redis_rule,) = [r for r in internal if ("TCP", 6379) in ports([r])]
    (peer,) = redis_rule["to"]
    assert selects(peer["podSelector"], redis)
    # Redis itself: reachable from this release's gateway and workers only, and talks to no one.
    redis_policy = policy(manifests, f"{FULLNAME}-redis")
    assert selects(redis_policy["podSelector"], redis)
    assert redis_policy["egress"] == []
    (allowed,) = redis_policy["ingress"][0]["from"]
    assert allowed["podSelector"]["matchExpressions"][0]["values"] == ["gateway", "worker"]

    offline = render(chart, values("networkPolicy: {allowModelHubEgress: false}"))
    egress = policy(offline, f"{FULLNAME}-workers")["egress"]
    assert ("TCP", 443) not in ports(egress)

    everything = rendered(chart, "everything")
    egress = policy(everything, f"{FULLNAME}-workers")["egress"]
    assert ("TCP", 9000) in ports(egress)
    dns = [r for r in egress if ("UDP", 53) in ports([r])]
    assert dns[0]["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"
    }
    assert "NetworkPolicy" not in render(chart, values("networkPolicy: {enabled: false}"))


def test_per_model_extra_egress_adds_a_policy_for_that_model(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        values("""
models:
  judge:
    kind: generative
    remote: {base_url: "http://vllm.judges:8000/v1", model: judge}
    deploy:
      extraEgress: [{to: [{namespaceSelector: {matchLabels: {name: judges}}}],
                     ports: [{protocol: TCP, port: 8000}]}]
"""),
    )
    extra = policy(manifests, f"{FULLNAME}-judge")
    assert extra["policyTypes"] == ["Egress"]
    assert selects(extra["podSelector"], worker(manifests, "judge"))
    assert not selects(extra["podSelector"], worker(manifests, "skywork-rm"))


# -- redis -------------------------------------------------------------------------------------


def test_redis_url_comes_from_an_existing_secret_by_default(chart: helm.Chart) -> None:
    manifests = rendered(chart, "external redis")
    for main in (
        container(gateway(manifests), "gateway"),
        container(worker(manifests, "skywork-rm"), "worker"),
    ):
        assert env(main)["RMSERVE_REDIS_URL"] == {"secretKeyRef": {"name": "queue", "key": "url"}}
    assert "StatefulSet" not in manifests


def test_in_chart_redis_for_development(chart: helm.Chart) -> None:
    manifests = rendered(chart, "in-chart redis")
    redis = one(manifests, "StatefulSet")
    service = one(manifests, "Service", f"{FULLNAME}-redis")
    main = container(redis, "redis")
    assert "--appendonly" in main["args"]
    assert main["args"][main["args"].index("--appendonly") + 1] == "yes"
    assert selects({"matchLabels": service["spec"]["selector"]}, redis)
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    url = env(container(worker(manifests, "skywork-rm"), "worker"))["RMSERVE_REDIS_URL"]
    assert url == f"redis://{FULLNAME}-redis:6379/0"
    notes = render_raw(chart, values(*VALUE_SETS["in-chart redis"]))["rmserve/templates/NOTES.txt"]
    assert "DEVELOPMENT" in notes
    assert "DEVELOPMENT" not in render_raw(chart)["rmserve/templates/NOTES.txt"]


def test_rendering_fails_without_a_redis(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"no Redis configured.*redis\.existingSecret"):
        render(chart, values("redis: {existingSecret: ''}"))
    with pytest.raises(helm.HelmRenderError, match=r"no Redis configured.*redis\.sentinel\.hosts"):
        render(chart, values("redis: {existingSecret: '', sentinel: {hosts: []}}"))


def test_redis_behind_sentinel(chart: helm.Chart) -> None:
    manifests = rendered(chart, "redis behind sentinel")
    for main in (
        container(gateway(manifests), "gateway"),
        container(worker(manifests, "skywork-rm"), "worker"),
    ):
        names = [e["name"] for e in main["env"]]
        assert len(names) == len(set(names)), names
        variables = env(main)
        assert variables["RMSERVE_REDIS_SENTINELS"] == "a:26379,b:26380"
        assert variables["RMSERVE_REDIS_SENTINEL_SERVICE"] == "queue-primary"
        assert variables["RMSERVE_REDIS_SENTINEL_PASSWORD"] == {
            "secretKeyRef": {"name": "sentinel-auth", "key": "password"}
        }
        assert variables["RMSERVE_REDIS_WAIT_REPLICAS"] == "1"
        assert variables["RMSERVE_REDIS_WAIT_TIMEOUT_S"] == "0.5"
        assert variables["RMSERVE_REDIS_TIMEOUT_S"] == "3"
        # No Secret: the sentinels name the primary, and it has no password or other database.
        assert "RMSERVE_REDIS_URL" not in variables
    assert "StatefulSet" not in manifests
    notes = render_raw(chart, values(*VALUE_SETS["redis behind sentinel"]))[
        "rmserve/templates/NOTES.txt"
    ]
    assert 'sentinels a:26379, b:26380 name\n"queue-primary"' in notes, notes
    assert "once 1 replica(s) have its jobs" in notes and "come from the URL" not in notes, notes

    # With existingSecret the URL still gives password, database and TLS; without a
    # passwordSecret the sentinels get none; the service defaults to mymaster.
    manifests = render(chart, values("redis: {sentinel: {hosts: [s-0, 's-1:26379']}}"))
    variables = env(container(worker(manifests, "skywork-rm"), "worker"))
    assert variables["RMSERVE_REDIS_URL"] == {
        "secretKeyRef": {"name": "rmserve-redis", "key": "redis-url"}
    }
    assert variables["RMSERVE_REDIS_SENTINELS"] == "s-0,s-1:26379"
    assert variables["RMSERVE_REDIS_SENTINEL_SERVICE"] == "mymaster"
    assert "RMSERVE_REDIS_SENTINEL_PASSWORD" not in variables


def test_redis_cluster(chart: helm.Chart) -> None:
    cluster_values = values("redis: {cluster: true}")
    manifests = render(chart, cluster_values)
    for main in (
        container(gateway(manifests), "gateway"),
        container(worker(manifests, "skywork-rm"), "worker"),
    ):
        variables = env(main)
        assert variables["RMSERVE_REDIS_CLUSTER"] == "true"
        assert variables["RMSERVE_REDIS_URL"] == {
            "secretKeyRef": {"name": "rmserve-redis", "key": "redis-url"}
        }
        assert not {"RMSERVE_REDIS_SENTINELS", "RMSERVE_REDIS_SENTINEL_SERVICE"} & variables.keys()
    notes = render_raw(chart, cluster_values)["rmserve/templates/NOTES.txt"]
    assert "The queue is the Redis Cluster" in notes and "no WAIT" in notes, notes
    assert "RMSERVE_REDIS_CLUSTER" not in env(
        container(gateway(rendered(chart, "defaults")), "gateway")
    )
    for refused, match in (
        ("redis: {cluster: true, sentinel: {hosts: [a]}}", "redis.cluster and redis.sentinel"),
        ("redis: {cluster: true, internal: {enabled: true}}", "redis.cluster and redis.internal"),
        ("redis: {cluster: true, waitReplicas: 1}", "redis.waitReplicas is not supported"),
        ("redis: {cluster: true, existingSecret: ''}", "redis.cluster needs redis.existingSecret"),
    ):
        with pytest.raises(helm.HelmRenderError, match=match):
            render(chart, values(refused))


def test_redis_defaults_without_sentinel(chart: helm.Chart) -> None:
    variables = env(container(gateway(rendered(chart, "defaults")), "gateway"))
    assert variables["RMSERVE_REDIS_WAIT_REPLICAS"] == "0"
    assert variables["RMSERVE_REDIS_WAIT_TIMEOUT_S"] == "1"
    assert variables["RMSERVE_REDIS_TIMEOUT_S"] == "5"
    assert not {"RMSERVE_REDIS_SENTINELS", "RMSERVE_REDIS_SENTINEL_SERVICE"} & variables.keys()
    # `env` overrides a setting without a second variable of the same name.
    main = container(
        gateway(render(chart, values("env: {RMSERVE_REDIS_TIMEOUT_S: 10}"))), "gateway"
    )
    assert [e.get("value") for e in main["env"] if e["name"] == "RMSERVE_REDIS_TIMEOUT_S"] == ["10"]


def test_network_policy_egress_reaches_the_sentinels(chart: helm.Chart) -> None:
    manifests = rendered(chart, "redis behind sentinel")
    for name in (f"{FULLNAME}-workers", f"{FULLNAME}-gateway"):
        egress = policy(manifests, name)["egress"]
        (redis_rule,) = [r for r in egress if ("TCP", 6379) in ports([r])]
        # The Redis nodes (redisPorts) and each sentinel port once, to the same CIDRs.
        assert ports([redis_rule]) == {("TCP", 6379), ("TCP", 26379), ("TCP", 26380)}
        assert len(redis_rule["ports"]) == 3
        assert redis_rule["to"] == [{"ipBlock": {"cidr": "10.30.0.0/16"}}]

    # A host without a port is on 26379; a sentinel port equal to a Redis port is listed once.
    manifests = render(
        chart,
        values("""
redis: {sentinel: {hosts: [sentinel, 'other:6380']}}
networkPolicy: {redisPorts: [6379, 6380]}
"""),
    )
    egress = policy(manifests, f"{FULLNAME}-workers")["egress"]
    (redis_rule,) = [r for r in egress if ("TCP", 6379) in ports([r])]
    assert [p["port"] for p in redis_rule["ports"]] == [6379, 6380, 26379]

    for bad in ("'a:port'", "'a:70000'"):
        with pytest.raises(helm.HelmRenderError, match=r"redis\.sentinel\.hosts"):
            render(chart, values(f"redis: {{sentinel: {{hosts: [{bad}]}}}}"))


def test_in_chart_redis_and_sentinel_exclude_each_other(chart: helm.Chart) -> None:
    with pytest.raises(
        helm.HelmRenderError, match=r"redis\.internal\.enabled and redis\.sentinel\.hosts"
    ):
        render(chart, values("redis: {internal: {enabled: true}, sentinel: {hosts: ['a:26379']}}"))


def test_sentinel_password_secret_needs_a_key(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"redis\.sentinel\.passwordSecret"):
        render(chart, values("redis: {sentinel: {hosts: [a], passwordSecret: {name: auth}}}"))


# -- gateway -----------------------------------------------------------------------------------


def test_gateway_service_hpa_pdb_and_ingress(chart: helm.Chart) -> None:
    manifests = rendered(chart, "ingress")
    deployment = gateway(manifests)
    main = container(deployment, "gateway")
    assert main["args"][0] == "gateway"
    service = one(manifests, "Service", FULLNAME)
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", 8000)
    assert port["targetPort"] in {p["name"] for p in main["ports"]}
    assert selects({"matchLabels": service["spec"]["selector"]}, deployment)
    workers = [d for d in manifests["Deployment"] if d is not deployment]
    assert workers
    assert not any(selects({"matchLabels": service["spec"]["selector"]}, d) for d in workers)

    hpa = one(manifests, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert "replicas" not in deployment["spec"]  # the HPA owns it

    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert selects(pdb["spec"]["selector"], deployment)

    ingress = one(manifests, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "rm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": FULLNAME, "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "rm-tls"

    fixed = rendered(chart, "everything")  # autoscaling off, maxUnavailable
    assert gateway(fixed)["spec"]["replicas"] == 2
    assert "HorizontalPodAutoscaler" not in fixed
    assert one(fixed, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": "25%",
        "selector": one(manifests, "PodDisruptionBudget")["spec"]["selector"],
    }
    assert "Ingress" not in rendered(chart, "defaults")


def test_workers_headless_service_selects_every_worker(chart: helm.Chart) -> None:
    manifests = rendered(chart, "several models")
    service = one(manifests, "Service", f"{FULLNAME}-workers")
    assert service["spec"]["clusterIP"] == "None"
    selected = [
        d
        for d in manifests["Deployment"]
        if selects({"matchLabels": service["spec"]["selector"]}, d)
    ]
    assert len(selected) == len(manifests["Deployment"]) - 1  # all but the gateway
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {name: p["port"] for name, p in service_ports.items()} == {
        "metrics": 8001,
        "sandbox": 8002,
    }
    for deployment in selected:
        assert service_ports["metrics"]["targetPort"] in {
            p["name"] for p in container(deployment, "worker")["ports"]
        }
        sidecars = [c for c in pod(deployment)["containers"] if c["name"] == "sandbox"]
        # Pods without the sandbox (math) have no such port: no endpoint for it, nothing else.
        assert {p["name"] for c in sidecars for p in c["ports"]} == (
            {service_ports["sandbox"]["targetPort"]} if model_of(deployment) != "math" else set()
        )


# -- KEDA and monitoring -----------------------------------------------------------------------


def test_keda_scales_each_model_on_its_stream_lag(chart: helm.Chart) -> None:
    assert "ScaledObject" not in rendered(chart, "several models")
    manifests = render(
        chart,
        values(
            EXTRA_VALUES,
            """
keda: {enabled: true, lagCount: 32, activationLagCount: 2}
models:
  remote-judge:
    deploy: {keda: {minReplicaCount: 0, maxReplicaCount: 2, pendingEntriesCount: null}}
  math: {deploy: {keda: {enabled: false}, replicas: 3}}
""",
        ),
    )
    scaled = {
        o["metadata"]["annotations"]["rmserve.io/model-name"]: o for o in manifests["ScaledObject"]
    }
    assert set(scaled) == {"skywork-rm", "qwen-math-prm", "local-rm", "unit-tests", "remote-judge"}
    (auth,) = manifests["TriggerAuthentication"]
    for model, obj in scaled.items():
        deployment = worker(manifests, model)
        target = obj["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert target["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"]  # KEDA owns it
        lag = obj["spec"]["triggers"][0]
        assert lag["type"] == "redis-streams"
        assert lag["metadata"]["stream"] == f"rmserve:{{{model}}}:jobs"
        assert lag["metadata"]["consumerGroup"] == "workers"
        assert (lag["metadata"]["lagCount"], lag["metadata"]["activationLagCount"]) == ("32", "2")
        assert "address" not in lag["metadata"]  # from the Secret, through the auth
        assert lag["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert worker(manifests, "math")["spec"]["replicas"] == 3

    judge = scaled["remote-judge"]["spec"]
    assert (judge["minReplicaCount"], judge["maxReplicaCount"]) == (0, 2)
    assert len(judge["triggers"]) == 1
    busy = scaled["skywork-rm"]["spec"]["triggers"][1]
    assert busy["metadata"]["pendingEntriesCount"] == "256"
    assert busy["metadata"]["stream"] == "rmserve:{skywork-rm}:jobs"

    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "address": ("rmserve-redis", "redis-address"),
        "password": ("rmserve-redis", "redis-password"),
    }


def test_keda_with_the_in_chart_redis_uses_its_service(chart: helm.Chart) -> None:
    manifests = rendered(chart, "keda with in-chart redis")
    assert "TriggerAuthentication" not in manifests
    (obj,) = manifests["ScaledObject"]
    for trigger in obj["spec"]["triggers"]:
        assert trigger["metadata"]["address"] == f"{FULLNAME}-redis.{NAMESPACE}.svc:6379"
        assert "authenticationRef" not in trigger
    ingress = policy(manifests, f"{FULLNAME}-redis")["ingress"][0]["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}
    } in ingress


def test_service_monitors_only_when_enabled(chart: helm.Chart) -> None:
    assert "ServiceMonitor" not in rendered(chart, "defaults")

    manifests = rendered(chart, "service monitor")
    monitors = {m["metadata"]["name"]: m for m in manifests["ServiceMonitor"]}
    pairs = {f"{FULLNAME}-gateway": FULLNAME, f"{FULLNAME}-worker": f"{FULLNAME}-workers"}
    assert set(monitors) == set(pairs)
    for monitor_name, service_name in pairs.items():
        monitor = monitors[monitor_name]
        service = one(manifests, "Service", service_name)
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            service["metadata"]["labels"].items()
        )
        endpoints = monitor["spec"]["endpoints"]
        for endpoint in endpoints:
            assert endpoint["path"] == "/metrics"
            assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
            assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("30s", "10s")
        # The gateway's port; in worker pods the worker's and the sandbox sidecar's.
        expected = ["http"] if service_name == FULLNAME else ["metrics", "sandbox"]
        assert [endpoint["port"] for endpoint in endpoints] == expected
        # Each monitor selects its own Service only.
        others = [s for s in manifests["Service"] if s["metadata"]["name"] != service_name]
        assert not any(
            monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
            for s in others
        )


def meta_labels(workload: dict[str, Any]) -> dict[str, str]:
    """The `__meta_kubernetes_pod_*` labels Prometheus gives a target in a pod of `workload`:
    label and annotation names with every character outside [a-zA-Z0-9_] made `_`."""
    metadata = workload["spec"]["template"]["metadata"]
    found = {}
    for kind, key in (("label", "labels"), ("annotation", "annotations")):
        for name, value in metadata.get(key, {}).items():
            found[f"__meta_kubernetes_pod_{kind}_{re.sub(r'[^a-zA-Z0-9_]', '_', name)}"] = value
    return found


def relabel(labels: dict[str, str], relabelings: list[dict[str, Any]]) -> dict[str, str]:
    """Prometheus' `replace` relabeling (the only action the chart uses); an empty result drops
    the label."""
    labels = dict(labels)
    for rule in relabelings:
        assert rule.get("action", "replace") == "replace", rule
        value = rule.get("separator", ";").join(
            labels.get(name, "") for name in rule.get("sourceLabels", [])
        )
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match is None:
            continue
        # $1 / ${1} in the replacement are the regex's groups.
        replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
        result = match.expand(replacement)
        if result:
            labels[rule["targetLabel"]] = result
        else:
            labels.pop(rule["targetLabel"], None)
    return labels


def test_service_monitors_label_targets_like_compose(chart: helm.Chart) -> None:
    # The Grafana dashboard groups by `role` and filters by `model`, target labels that
    # deploy/prometheus.yml sets in docker compose (with honor_labels, so that a worker's series
    # about other models keep their own `model`). The ServiceMonitors must give the same ones.
    compose = yaml.safe_load(COMPOSE_PROMETHEUS.read_text())
    jobs = [job for job in compose["scrape_configs"] if job["job_name"].startswith("rmserve-")]
    compose_roles = {
        rule["replacement"]
        for job in jobs
        for rule in job["relabel_configs"]
        if rule["target_label"] == "role"
    }
    assert all(job["honor_labels"] for job in jobs)
    roles = {"http": "gateway", "metrics": "worker", "sandbox": "sandbox"}
    assert set(roles.values()) == compose_roles

    # A model name its Kubernetes slug (the label rmserve.io/model) does not keep.
    manifests = render(
        chart,
        values(
            EXTRA_VALUES,
            "serviceMonitor: {enabled: true}",
            "models: {Skywork_RM.v2: {kind: discriminative, weights: org/rm}}",
        ),
    )
    monitors = {m["metadata"]["name"]: m for m in manifests["ServiceMonitor"]}
    for monitor in monitors.values():
        validate(monitor)
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["honorLabels"] is True, endpoint["port"]

    (gateway_endpoint,) = monitors[f"{FULLNAME}-gateway"]["spec"]["endpoints"]
    assert relabel(meta_labels(gateway(manifests)), gateway_endpoint["relabelings"]) == (
        meta_labels(gateway(manifests)) | {"role": "gateway"}
    )

    worker_endpoints = monitors[f"{FULLNAME}-worker"]["spec"]["endpoints"]
    assert [e["port"] for e in worker_endpoints] == ["metrics", "sandbox"]
    served = set()
    for deployment in manifests["Deployment"]:
        if deployment is gateway(manifests):
            continue
        # The name the worker serves, hence the `model` label of its own series.
        args = container(deployment, "worker")["args"]
        model = args[args.index("--model") + 1]
        for endpoint in worker_endpoints:
            target = relabel(meta_labels(deployment), endpoint["relabelings"])
            assert (target["role"], target["model"]) == (roles[endpoint["port"]], model)
        served.add(model)
    assert {"skywork-rm", "qwen-math-prm", "Skywork_RM.v2"} <= served
    odd = worker(manifests, "Skywork_RM.v2")
    assert odd["spec"]["template"]["metadata"]["labels"]["rmserve.io/model"] == "skywork-rm-v2"

    # The CRD schema refuses a misspelt relabeling field.
    broken = copy.deepcopy(monitors[f"{FULLNAME}-gateway"])
    broken["spec"]["endpoints"][0]["relabelings"][0]["target_label"] = "role"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


# -- values.schema.json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_values", "message"),
    [
        ("models: {rm: {kind: discriminative}}", "weights"),
        ("models: {prm: {kind: process, options: {step_tag: x}}}", "weights"),
        ("models: {judge: {kind: generative}}", "weights"),
        ("models: {judge: {kind: llm-judge, weights: org/judge}}", "/models/judge/kind"),
        ("models: {math: {kind: math, weights: org/x}}", "/models/math/weights"),
        ("models: {skywork-rm: {deploy: {replicas: -1}}}", "/models/skywork-rm/deploy/replicas"),
        ("models: {skywork-rm: {deploy: {gpus: 2}}}", "gpus"),
        ("gateway: {replicas: -2}", "/gateway/replicas"),
        ("workerDefaults: {gpu: {count: -1}}", "/workerDefaults/gpu/count"),
        ("modles: {}", "modles"),
        ("models: {skywork-rm: null}", "minProperties"),
        ("sandbox: {seccompProfile: {type: Unconfned}}", "/sandbox/seccompProfile/type"),
        ("gateway: {auth: {enabled: 'no'}}", "/gateway/auth/enabled"),
        ("gateway: {apiKeys: {existingSecret: keys}}", "apiKeys"),
        ("redis: {waitReplicas: -1}", "/redis/waitReplicas"),
        ("redis: {waitReplicas: 17}", "/redis/waitReplicas"),
        ("redis: {waitTimeoutS: 0}", "/redis/waitTimeoutS"),
        ("redis: {timeoutS: 1}", "/redis/timeoutS"),
        ("redis: {sentinel: {host: ['a:26379']}}", "'host' not allowed"),
        ("redis: {sentinel: {hosts: ['a:26379,b:26379']}}", "/redis/sentinel/hosts/0"),
        ("redis: {sentinel: {service: ''}}", "/redis/sentinel/service"),
    ],
)
def test_schema_rejects_bad_values(chart: helm.Chart, bad_values: str, message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        render(chart, values(bad_values))


def test_schema_accepts_models_without_weights_that_need_none(chart: helm.Chart) -> None:
    manifests = render(
        chart,
        values("""
models:
  judge: {kind: generative, remote: {base_url: "https://api.example.com/v1", model: gpt}}
  fmt: {kind: format, options: {json_valid: true}}
  parked: {kind: discriminative, weights: org/rm, deploy: {replicas: 0}}
"""),
    )
    assert worker(manifests, "parked")["spec"]["replicas"] == 0


def test_lint_reports_values_that_break_the_schema() -> None:
    broken = helm.lint(CHART, {"models": {"x": {"kind": "discriminative"}}})
    assert broken["errors"], "lint should report values that break the schema"
