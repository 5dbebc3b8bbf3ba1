"""The Helm chart (helm/rmserve) renders, lints and wires registry, probes and security right.

Rendered and linted with the Helm engine itself, from PyPI (helm-python-sdk, module
helm_python), so no helm binary is needed. Values go through the same coalescing as
`helm install -f FILE`: the chart's values.yaml, then the user's file on top.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from models.spec import load_registry

CHART = Path(__file__).resolve().parents[1] / "helm" / "rmserve"
RELEASE = "rm"
NAMESPACE = "rmserve-test"

# A second values file, as a user would pass with `helm install -f`: it adds two models to the
# registry map of the chart's values.yaml, one with local weights named through ${VAR}.
EXTRA_VALUES = r"""
models:
  qwen-math-prm:
    kind: process
    weights: Qwen/Qwen2.5-Math-PRM-7B
    engine: {max_model_len: 4096, dtype: bfloat16, trust_remote_code: true}
    options: {steps: separator, separator: "\n\n", step_tag: "<extra_0>", aggregate: min}
  local-rm:
    kind: discriminative
    weights: ${RMSERVE_TEST_WEIGHTS}/local-rm
    engine: {max_model_len: 256, dtype: float32}
"""

Manifests = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_raw(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Manifests:
    """Rendered objects by kind."""
    by_kind: Manifests = {}
    for path, text in render_raw(chart, values).items():
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc:
                by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


def one(manifests: Manifests, kind: str) -> dict[str, Any]:
    objects = manifests.get(kind, [])
    assert len(objects) == 1, f"expected one {kind}, got {len(objects)}"
    return objects[0]


def pod_spec(manifests: Manifests) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def container(manifests: Manifests) -> dict[str, Any]:
    containers = pod_spec(manifests)["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def registry_text(manifests: Manifests) -> str:
    text: str = one(manifests, "ConfigMap")["data"]["registry.yaml"]
    return text


def test_deployment_runs_the_configured_image(chart: helm.Chart) -> None:
    default = container(render(chart))
    assert default["image"] == f"rmserve:{chart.metadata['appVersion']}"

    custom = container(
        render(chart, {"image": {"repository": "registry.example.com/ml/rmserve", "tag": "1.2.3"}})
    )
    assert custom["image"] == "registry.example.com/ml/rmserve:1.2.3"
    assert custom["command"] == ["rmserve"]
    assert custom["args"][0] == "serve"


def test_deployment_mounts_the_registry_configmap(chart: helm.Chart) -> None:
    manifests = render(chart)
    configmap = one(manifests, "ConfigMap")
    main = container(manifests)
    args = main["args"]
    registry = Path(args[args.index("--registry") + 1])

    mount = next(m for m in main["volumeMounts"] if m["mountPath"] == str(registry.parent))
    volume = next(v for v in pod_spec(manifests)["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert registry.name in configmap["data"]
    assert mount.get("readOnly") is True


def test_probes_use_distinct_liveness_and_readiness_paths(chart: helm.Chart) -> None:
    main = container(render(chart))
    liveness = main["livenessProbe"]["httpGet"]
    readiness = main["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    ports = {port["name"] for port in main["ports"]}
    assert liveness["port"] in ports
    assert readiness["port"] in ports
    # Loading models takes minutes: the process must get time to come up before liveness
    # applies.
    startup = main["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 300


def test_runs_as_non_root_with_all_capabilities_dropped(chart: helm.Chart) -> None:
    manifests = render(chart)
    pod = pod_spec(manifests)
    main = container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = main["securityContext"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert not security["capabilities"].get("add")
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert pod["automountServiceAccountToken"] is False

    # With a read-only root, /tmp and HF_HOME must be volumes.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in main["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["HF_HOME"] in mounts
    assert env["HOME"] in mounts


def test_gpu_request_is_optional(chart: helm.Chart) -> None:
    gpu = container(render(chart, {"gpus": 2}))["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 2
    assert gpu["limits"]["memory"] == "32Gi"  # merged with, not replacing, the given limits

    cpu = container(render(chart, {"gpus": 0}))["resources"]
    assert "nvidia.com/gpu" not in cpu.get("limits", {})


def test_values_file_adds_models_to_the_registry(
    chart: helm.Chart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values_file = tmp_path / "models.yaml"
    values_file.write_text(EXTRA_VALUES)
    values = helm.values_from_yaml(values_file.read_text())

    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(registry_text(render(chart, values)))
    weights = tmp_path / "weights"
    monkeypatch.setenv("RMSERVE_TEST_WEIGHTS", str(weights))
    registry = load_registry(registry_file)

    # The chart's default model and both added ones: the map merged, nothing was replaced.
    assert set(registry.models) == {"skywork-rm", "qwen-math-prm", "local-rm"}
    prm = registry.models["qwen-math-prm"]
    assert prm.kind == "process"
    assert prm.options.separator == "\n\n"  # survives toYaml inside the ConfigMap
    assert prm.options.step_tag == "<extra_0>"
    assert prm.engine.trust_remote_code is True
    assert registry.models["local-rm"].weights == str(weights / "local-rm")
    assert registry.models["skywork-rm"].weights == "Skywork/Skywork-Reward-V2-Qwen3-0.6B"


def test_null_removes_a_default_model(chart: helm.Chart, tmp_path: Path) -> None:
    values = helm.values_from_yaml(
        "models:\n  skywork-rm: null\n  other-rm: {kind: discriminative, weights: org/other}\n"
    )
    registry_file = tmp_path / "registry.yaml"
    registry_file.write_text(registry_text(render(chart, values)))
    assert set(load_registry(registry_file).models) == {"other-rm"}


def test_registry_change_rolls_the_pods(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        deployment = one(render(chart, values), "Deployment")
        annotation: str = deployment["spec"]["template"]["metadata"]["annotations"][
            "checksum/registry"
        ]
        return annotation

    default = checksum(None)
    configmap = render_raw(chart)["rmserve/templates/configmap.yaml"]
    assert default == hashlib.sha256(configmap.encode()).hexdigest()
    assert checksum(None) == default
    assert checksum(helm.values_from_yaml(EXTRA_VALUES)) != default
    assert checksum({"replicaCount": 3}) == default


def test_schema_rejects_invalid_models(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="/models/judge/kind"):
        render(chart, {"models": {"judge": {"kind": "generative", "weights": "org/judge"}}})
    with pytest.raises(helm.HelmValuesError, match="weights"):
        render(chart, {"models": {"no-weights": {"kind": "discriminative"}}})
    with pytest.raises(helm.HelmValuesError, match="modles"):
        render(chart, {"modles": {}})
    with pytest.raises(helm.HelmValuesError, match="minProperties"):
        render(chart, {"models": {"skywork-rm": None}})


def test_lint_passes(tmp_path: Path) -> None:
    for values in (
        None,
        helm.values_from_yaml(EXTRA_VALUES),
        {"serviceMonitor": {"enabled": True}, "gpus": 0, "hfCache": {"existingClaim": "hf"}},
    ):
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        assert report["total_charts_linted"] == 1
        assert report["errors"] == [], report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems

    broken = helm.lint(CHART, {"models": {"x": {"kind": "generative", "weights": "org/x"}}})
    assert broken["errors"], "lint should report values that break the schema"


def test_service_monitor_only_when_enabled(chart: helm.Chart) -> None:
    assert "ServiceMonitor" not in render(chart)

    manifests = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"team": "rl"}}})
    monitor = one(manifests, "ServiceMonitor")
    service = one(manifests, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["team"] == "rl"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}


def test_service_selects_the_pods(chart: helm.Chart) -> None:
    manifests = render(chart)
    service = one(manifests, "Service")
    deployment = one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(manifests)["ports"]}


def test_hf_token_comes_from_an_existing_secret(chart: helm.Chart) -> None:
    assert "HF_TOKEN" not in {e["name"] for e in container(render(chart))["env"]}

    main = container(render(chart, {"hfToken": {"existingSecret": "hf", "key": "token"}}))
    (token,) = [e for e in main["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert "value" not in token


def test_env_values_become_container_env(chart: helm.Chart) -> None:
    main = container(render(chart, {"env": {"RMSERVE_MAX_ITEMS_PER_REQUEST": 2048}}))
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["RMSERVE_MAX_ITEMS_PER_REQUEST"] == "2048"  # strings, as Kubernetes requires
