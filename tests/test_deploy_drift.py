"""The Dockerfile, the compose files and their Prometheus configs use commands, flags and ports
the `rmserve` CLI really has (images cannot be built here, so drift is caught by reading them)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import SANDBOX_PORT, WORKER_PORT, build_parser

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PORTS = {"serve": 8000, "gateway": 8000, "worker": WORKER_PORT, "sandbox": SANDBOX_PORT}


def listening_port(command: list[str]) -> int:
    """The port `rmserve <command>` listens on, after the CLI parsed it."""
    args = build_parser().parse_args(command)  # SystemExit on an unknown command or flag
    return int(args.port) if args.port is not None else DEFAULT_PORTS[args.command]


def dockerfile_json(instruction: str) -> list[list[str]]:
    text = (REPO / "Dockerfile").read_text()
    return [json.loads(m) for m in re.findall(rf"^{instruction} (\[.*\])$", text, re.MULTILINE)]


def test_the_dockerfile_runs_a_real_command_on_the_port_it_exposes() -> None:
    text = (REPO / "Dockerfile").read_text()
    entrypoints, commands = dockerfile_json("ENTRYPOINT"), dockerfile_json("CMD")
    assert entrypoints and all(e == ["rmserve"] for e in entrypoints)
    exposed = {int(p) for p in re.findall(r"^EXPOSE (\d+)$", text, re.MULTILINE)}
    for command in commands:
        assert listening_port(command) in exposed, command
    for port in re.findall(r"urlopen\('http://127\.0\.0\.1:(\d+)/healthz'", text):
        assert int(port) in exposed
    for package in ("service", "models", "sandbox", "rmserve_client"):
        assert f"COPY {package} ./{package}" in text, f"the image lacks the {package} package"


def compose_services() -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for path in sorted((REPO / "deploy").glob("compose*.yaml")):
        for name, service in yaml.safe_load(path.read_text())["services"].items():
            if str(service.get("image", "")).startswith("rmserve"):
                found.append((path.name, name, service))
    return found


@pytest.mark.parametrize(("file", "name", "service"), compose_services())
def test_compose_services_run_real_commands_on_their_published_ports(
    file: str, name: str, service: dict[str, Any]
) -> None:
    command = service.get("command", ["serve", "--host", "0.0.0.0", "--port", "8000",
                                      "--registry", "/etc/rmserve/registry.yaml"])  # fmt: skip
    port = listening_port(command)
    for mapping in service.get("ports", []):
        assert int(str(mapping).split(":")[-1]) == port, (file, name, mapping)


def test_prometheus_scrapes_ports_the_services_listen_on() -> None:
    for path in sorted((REPO / "deploy").glob("compose*.yaml")):
        services = yaml.safe_load(path.read_text())["services"]
        prometheus = services.get("prometheus")
        if prometheus is None:
            continue
        config_file = next(v.split(":")[0] for v in prometheus["volumes"] if "prometheus" in v)
        config = yaml.safe_load((path.parent / config_file).read_text())
        for job in config["scrape_configs"]:
            targets = [(n, sd["port"]) for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
            targets += [tuple(t.split(":")) for s in job.get("static_configs", [])
                        for t in s["targets"]]  # fmt: skip
            for host, port in targets:
                assert host in services, (path.name, job["job_name"], host)
                command = services[host].get("command")
                if command is not None and services[host].get("image", "").startswith("rmserve"):
                    assert listening_port(command) == int(port), (path.name, host, port)
