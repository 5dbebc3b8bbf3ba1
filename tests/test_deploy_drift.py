"""deploy/ and the Dockerfile agree with the code: images cannot be built here, so drift is caught
by reading them. Commands, flags and ports are parsed with the real CLI parser, environment
variables checked against the real settings, the registry loaded with the real loader, and every
metric the Grafana dashboard queries looked up in the real metric registries."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import yaml

from rmserve.models.spec import load_registry
from rmserve.sandbox.config import SandboxSettings
from rmserve.sandbox.metrics import SandboxMetrics
from rmserve.service.cli import SANDBOX_PORT, WORKER_PORT, build_parser
from rmserve.service.config import Settings
from rmserve.service.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "rmserve.json"
DEFAULT_PORTS = {"serve": 8000, "gateway": 8000, "worker": WORKER_PORT, "sandbox": SANDBOX_PORT}
PROBES = {"/startupz", "/healthz", "/readyz"}


class Metric(NamedTuple):
    kind: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    source: str  # who exports it: "service" (gateway and workers), "sandbox", or "all"


# The metrics as documented (design.md, "Observability"), by the name Prometheus stores: a
# counter family X is exposed as X_total. The dashboard may query these and no others.
DOCUMENTED_METRICS: dict[str, Metric] = {
    "rmserve_build_info": Metric("gauge", ("version", "python", "vllm", "role"), "service"),
    "rmserve_http_requests_total": Metric("counter", ("route", "code"), "all"),
    "rmserve_http_request_duration_seconds": Metric("histogram", ("route",), "all"),
    "rmserve_jobs_enqueued_total": Metric("counter", ("model",), "service"),
    "rmserve_jobs_acked_total": Metric("counter", ("model",), "service"),
    "rmserve_jobs_redelivered_total": Metric("counter", ("model",), "service"),
    "rmserve_jobs_dead_lettered_total": Metric("counter", ("model",), "service"),
    "rmserve_jobs_total": Metric("counter", ("model", "outcome"), "service"),
    "rmserve_queue_wait_seconds": Metric("histogram", ("model",), "service"),
    "rmserve_job_duration_seconds": Metric("histogram", ("model", "kind"), "service"),
    "rmserve_queue_pending": Metric("gauge", ("model",), "service"),
    "rmserve_queue_lag": Metric("gauge", ("model",), "service"),
    "rmserve_engine_batch_size": Metric("histogram", ("model",), "service"),
    "rmserve_engine_prompt_tokens_total": Metric("counter", ("model",), "service"),
    "rmserve_engine_generation_tokens_total": Metric("counter", ("model",), "service"),
    "rmserve_engine_running": Metric("gauge", ("model",), "service"),
    "rmserve_engine_waiting": Metric("gauge", ("model",), "service"),
    "rmserve_engine_kv_cache_usage_ratio": Metric("gauge", ("model",), "service"),
    "rmserve_model_ready": Metric("gauge", ("model",), "service"),
    "rmserve_tool_calls_total": Metric("counter", ("tool", "outcome"), "sandbox"),
    "rmserve_tool_call_duration_seconds": Metric("histogram", ("tool",), "sandbox"),
    "rmserve_sandbox_kills_total": Metric("counter", ("reason",), "sandbox"),
    "rmserve_sandbox_code_runs_active": Metric("gauge", (), "sandbox"),
}

# The dashboard's rows and metrics each of them must show.
DASHBOARD_GROUPS = {
    "Overview": {"rmserve_model_ready", "rmserve_build_info"},
    "Throughput": {"rmserve_jobs_total", "rmserve_http_requests_total"},
    "Latency": {
        "rmserve_http_request_duration_seconds",
        "rmserve_job_duration_seconds",
        "rmserve_queue_wait_seconds",
    },
    "Queue": {"rmserve_queue_pending", "rmserve_queue_lag"},
    "Errors": {
        "rmserve_http_requests_total",
        "rmserve_jobs_total",
        "rmserve_jobs_dead_lettered_total",
        "rmserve_jobs_redelivered_total",
    },
    "Tool calls": {
        "rmserve_tool_calls_total",
        "rmserve_tool_call_duration_seconds",
        "rmserve_sandbox_kills_total",
    },
    "Engine": {
        "rmserve_engine_batch_size",
        "rmserve_engine_running",
        "rmserve_engine_waiting",
        "rmserve_engine_kv_cache_usage_ratio",
        "rmserve_engine_prompt_tokens_total",
        "rmserve_engine_generation_tokens_total",
    },
}


def listening_port(command: list[str]) -> int:
    """The port `rmserve <command>` listens on, after the CLI parsed it."""
    args = build_parser().parse_args(command)  # SystemExit on an unknown command or flag
    return int(args.port) if args.port is not None else DEFAULT_PORTS[args.command]


def dockerfile_json(instruction: str) -> list[list[str]]:
    text = (REPO / "Dockerfile").read_text()
    return [json.loads(m) for m in re.findall(rf"^{instruction} (\[.*\])$", text, re.MULTILINE)]


def runtime_stages() -> dict[str, str]:
    """The Dockerfile's final stages (cpu, gpu) by name: their text up to the next FROM."""
    text = (REPO / "Dockerfile").read_text()
    parts = re.split(r"^FROM \S+ AS (\S+)$", text, flags=re.MULTILINE)
    stages = dict(zip(parts[1::2], parts[2::2], strict=True))
    return {name: stages[name] for name in ("cpu", "gpu")}


def test_both_images_run_non_root_with_bubblewrap_for_the_sandbox() -> None:
    for name, stage in runtime_stages().items():
        assert re.search(r"^USER 10001:10001$", stage, re.MULTILINE), name
        assert re.search(r"apt-get install .*\bbubblewrap\b", stage), name
        assert 'ENTRYPOINT ["rmserve"]' in stage, name


def test_the_dockerfile_runs_a_real_command_on_the_port_it_exposes() -> None:
    text = (REPO / "Dockerfile").read_text()
    entrypoints, commands = dockerfile_json("ENTRYPOINT"), dockerfile_json("CMD")
    assert entrypoints and all(e == ["rmserve"] for e in entrypoints)
    exposed = {
        int(port)
        for line in re.findall(r"^EXPOSE ([\d ]+)$", text, re.MULTILINE)
        for port in line.split()
    }
    for command in commands:
        assert listening_port(command) in exposed, command
    assert set(DEFAULT_PORTS.values()) <= exposed  # one image runs every role
    for folder in ("wire", "web", "sandbox", "models", "service", "examples", "client"):
        assert f"COPY {folder} ./{folder}" in text, f"the image lacks the {folder} folder"


# -- compose -------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves the <<: merges
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def rmserve_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services().items() if str(s.get("image", "")).startswith("rmserve")}


def role(service: dict[str, Any]) -> str:
    return str(service["command"][0])


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """NAME=value entries, and bare NAME entries (passed through from the shell) as None."""
    entries = service.get("environment", [])
    if isinstance(entries, dict):
        return {k: None if v is None else str(v) for k, v in entries.items()}
    return {e.split("=", 1)[0]: e.split("=", 1)[1] if "=" in e else None for e in entries}


def container_port(mapping: str | int) -> int:
    """The container side of a `ports` entry: 8000, "8000:8000", "127.0.0.1:8000:8000/tcp"."""
    return int(str(mapping).split(":")[-1].split("/")[0])


def networks(service: dict[str, Any]) -> set[str]:
    return set(service.get("networks", ["default"]))


def host_default(path: str) -> Path:
    """The host side of a bind mount, with ${VAR:-default} taken at its default."""
    return DEPLOY / re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", path)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path (relative to deploy/) or volume name."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", volume).split(":")[:2]
        found[target] = source
    return found


def test_compose_runs_every_role() -> None:
    roles = [role(s) for s in rmserve_services().values()]
    assert sorted(set(roles)) == ["gateway", "sandbox", "worker"]
    assert {"redis", "prometheus", "grafana"} <= set(services())
    assert not list(DEPLOY.glob("compose.*.yaml")), "one compose file: deploy/compose.yaml"


@pytest.mark.parametrize("name", sorted(rmserve_services()))
def test_compose_services_run_real_commands_on_their_ports_and_probe_them(name: str) -> None:
    service = rmserve_services()[name]
    port = listening_port(service["command"])
    assert port == DEFAULT_PORTS[role(service)], "the ports the docs, Helm and Prometheus expect"
    for mapping in service.get("ports", []):
        assert container_port(mapping) == port, mapping
    # Without its own health check a service inherits the image's, which probes port 8000.
    probe = " ".join(service["healthcheck"]["test"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", probe)
    assert url and int(url[1]) == port and url[2] in PROBES, probe


def test_one_worker_per_registry_model_with_the_mounted_registry() -> None:
    workers = {n: s for n, s in rmserve_services().items() if role(s) == "worker"}
    models = {}
    for name, service in workers.items():
        args = build_parser().parse_args(service["command"])
        registry = load_registry(host_default(mounts(service)[str(args.registry)]))
        assert args.model in registry.models, (name, args.model)
        assert name == f"worker-{args.model}", "Prometheus takes the model from the service name"
        models[args.model] = registry
    assert len(models) == len(workers) and models, "one worker service per model"
    for registry in models.values():
        assert set(registry.models) == set(models)
    gateway = rmserve_services()["gateway"]
    registry_flag = build_parser().parse_args(gateway["command"]).registry
    assert str(registry_flag) in mounts(gateway), "the gateway reads the registry it is given"


@pytest.mark.parametrize("name", sorted(rmserve_services()))
def test_compose_environment_names_real_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown RMSERVE_* variable is ignored silently at run time: only this catches it."""
    service = rmserve_services()[name]
    sandbox = role(service) == "sandbox"
    settings = SandboxSettings if sandbox else Settings
    prefix = "RMSERVE_SANDBOX_" if sandbox else "RMSERVE_"
    env = environment(service)
    for key in env:
        if key.startswith("RMSERVE_"):
            assert key.startswith(prefix), f"{name} reads {prefix}*, not {key}"
            field = key.removeprefix(prefix).lower()
            assert field in settings.model_fields, f"{name}: {key} is no {settings.__name__} field"
    for key, value in env.items():
        if key.startswith(prefix) and value is not None:
            monkeypatch.setenv(key, value)
    settings()  # the values validate
    sandbox_port = listening_port(rmserve_services()["sandbox"]["command"])
    addresses = {
        "RMSERVE_REDIS_URL": ("redis", 6379),
        "RMSERVE_SANDBOX_URL": ("sandbox", sandbox_port),
    }
    for key, (host, port) in addresses.items():
        if env.get(key):
            url = urlsplit(env[key] or "")
            assert (url.hostname, url.port) == (host, port), (name, key)
            assert networks(service) & networks(services()[host]), f"{name} cannot reach {host}"


def test_compose_starts_services_after_what_they_need() -> None:
    needs = {"gateway": {"redis"}, "worker": {"redis", "sandbox"}, "sandbox": set()}
    for name, service in rmserve_services().items():
        depends = service.get("depends_on", {})
        assert needs[role(service)] <= set(depends), name
        for dependency in needs[role(service)]:
            assert depends[dependency]["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services()[dependency], dependency


def test_the_sandbox_container_is_locked_down_but_can_run_bubblewrap() -> None:
    all_services, network_specs = services(), compose()["networks"]
    [(name, sandbox)] = [(n, s) for n, s in rmserve_services().items() if role(s) == "sandbox"]
    assert all(network_specs[n].get("internal") for n in networks(sandbox)), "no route out"
    assert not sandbox.get("ports"), "nothing published"
    assert sandbox["read_only"] is True and sandbox["cap_drop"] == ["ALL"]
    assert any(str(t).split(":")[0] == "/tmp" for t in sandbox["tmpfs"])
    # Docker's default seccomp and AppArmor profiles stop bubblewrap's user namespaces and mounts;
    # Docker's masked /proc stops a fresh procfs.
    assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(sandbox["security_opt"])
    assert environment(sandbox).get("RMSERVE_SANDBOX_MOUNT_PROC") == "false"
    for other, service in all_services.items():
        if networks(service) & networks(sandbox) and other != name:
            assert other in ("gateway", "prometheus") or other.startswith("worker-"), other


# -- Prometheus ----------------------------------------------------------------------------------


def prometheus_config() -> dict[str, Any]:
    prometheus = services()["prometheus"]
    config_file = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / config_file).read_text())
    return loaded


def test_prometheus_scrapes_every_service_on_its_port_with_role_and_model_labels() -> None:
    all_services, scraped = services(), set()
    for job in prometheus_config()["scrape_configs"]:
        targets = [(n, int(sd["port"])) for sd in job.get("dns_sd_configs", [])
                   for n in sd["names"]]  # fmt: skip
        targets += [(t.split(":")[0], int(t.split(":")[1])) for s in job.get("static_configs", [])
                    for t in s["targets"]]  # fmt: skip
        relabels = {r["target_label"]: r for r in job.get("relabel_configs", [])}
        for host, port in targets:
            if host == "localhost":
                continue
            assert host in all_services, (job["job_name"], host)
            assert networks(all_services[host]) & networks(all_services["prometheus"]), host
            scraped.add((host, port))
            if host in rmserve_services():
                assert relabels["role"]["replacement"] == role(all_services[host]), host
                assert job.get("honor_labels") is True, "keep the series' own `model` labels"
            if host.startswith("worker-"):
                regex = relabels["model"]["regex"]
                assert relabels["model"]["source_labels"] == ["__meta_dns_name"]
                assert re.fullmatch(regex, host), (regex, host)
    expected = {(n, listening_port(s["command"])) for n, s in rmserve_services().items()}
    assert expected <= scraped, expected - scraped


# -- Grafana -------------------------------------------------------------------------------------


def test_grafana_provisions_the_prometheus_data_source_and_the_dashboard() -> None:
    grafana = services()["grafana"]
    volumes = mounts(grafana)
    provisioning = DEPLOY / volumes["/etc/grafana/provisioning"]
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    url = urlsplit(datasource["url"])
    assert datasource["type"] == "prometheus" and url.hostname == "prometheus" and url.port == 9090
    assert [container_port(p) for p in services()["prometheus"]["ports"]] == [9090]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "rmserve.yaml").read_text())[
        "providers"
    ]
    dashboards_dir = provider["options"]["path"]
    assert (DEPLOY / volumes[dashboards_dir]).resolve() == DASHBOARD.parent.resolve()
    env = environment(grafana)
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] or ""
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert [container_port(p) for p in grafana["ports"]] == [3000]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), "a pinned tag"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_groups() -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    current = None
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            current = groups.setdefault(panel["title"], [])
            current.extend(panel.get("panels", []))  # a collapsed row holds its panels
        else:
            assert current is not None, f"panel {panel['title']!r} is in no row"
            current.append(panel)
    return groups


def metric_names(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\brmserve_\w+", expr)}


def test_the_dashboard_has_its_variables() -> None:
    board = dashboard()
    assert board["uid"] == "rmserve" and board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["definition"] == "label_values(rmserve_model_ready, model)"
    assert model["query"]["query"] == model["definition"]
    assert model["includeAll"] and model["multi"]


def test_the_dashboard_shows_each_group_with_units_on_the_chosen_data_source() -> None:
    groups = panel_groups()
    assert set(DASHBOARD_GROUPS) <= set(groups), set(DASHBOARD_GROUPS) - set(groups)
    for group, panels in groups.items():
        shown = set()
        for panel in panels:
            assert panel["type"] in ("timeseries", "stat"), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", panel["title"]
                shown |= metric_names(target["expr"])
        assert DASHBOARD_GROUPS.get(group, set()) <= shown, (group, DASHBOARD_GROUPS[group] - shown)
    quantiles = [t["expr"] for p in groups["Latency"] for t in p["targets"]]
    for q in ("0.5", "0.9", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q},") for e in quantiles), q


def test_the_dashboard_queries_documented_metrics_only_and_all_of_them() -> None:
    used: set[str] = set()
    for panels in panel_groups().values():
        for target in (t for p in panels for t in p["targets"]):
            expr = target["expr"]
            for name in metric_names(expr):
                assert name in DOCUMENTED_METRICS, f"{name} (in {expr}) is not documented"
                selectors = re.findall(rf"\b{name}(?:_bucket|_sum|_count)?(\{{[^}}]*\}})?", expr)
                if "model" in DOCUMENTED_METRICS[name].labels:
                    assert all('model=~"$model"' in s for s in selectors), expr
                if DOCUMENTED_METRICS[name].kind == "histogram":
                    assert f"{name}_bucket" in expr or f"{name}_count" in expr, expr
            used |= metric_names(expr)
    assert used == set(DOCUMENTED_METRICS), set(DOCUMENTED_METRICS) - used


def exposed_names(registry: Any) -> dict[str, str]:
    """Exposed name -> type of each metric family of a prometheus_client registry."""
    suffix = {"counter": "_total", "info": "_info"}
    kinds = {"info": "gauge"}  # an Info is a gauge of value 1
    return {
        family.name + suffix.get(family.type, ""): kinds.get(family.type, family.type)
        for family in registry.collect()
    }


def test_documented_metrics_exist_in_the_live_registries() -> None:
    """Every metric the dashboard queries exists, with its type, where it is documented."""
    live = {"service": exposed_names(Metrics().registry)}
    live["sandbox"] = exposed_names(SandboxMetrics().registry)
    problems = []
    for name, metric in DOCUMENTED_METRICS.items():
        for source in ("service", "sandbox") if metric.source == "all" else (metric.source,):
            if name not in live[source]:
                problems.append(f"{name} missing from the {source} registry")
            elif live[source][name] != metric.kind:
                problems.append(f"{name} is a {live[source][name]}, documented as {metric.kind}")
    assert not problems, "\n".join(problems)


def test_the_readme_metrics_table_lists_exactly_the_live_metrics() -> None:
    """The README's metrics table (name and type) matches what the servers expose."""
    readme = (REPO / "README.md").read_text()
    table = re.findall(r"^\| `(rmserve_[a-z_]+)` \| (counter|gauge|histogram)", readme, re.M)
    live = exposed_names(Metrics().registry) | exposed_names(SandboxMetrics().registry)
    assert dict(table) == live
