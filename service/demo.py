"""`rmserve demo`: start the embedded service, score the example trajectories, print the rewards.

The service runs as a child process on a free loopback port, exactly as `rmserve serve` would;
the demo is an HTTP client of it. Models that cannot load are listed with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from models.spec import RegistryError, load_registry
from service.config import Settings

console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_demo(settings: Settings, port: int | None, examples: Path, load_timeout_s: float) -> int:
    try:
        load_registry(settings.registry)
        items = [json.loads(line) for line in examples.read_text().splitlines() if line.strip()]
    except (RegistryError, OSError, json.JSONDecodeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    port = port or free_port()
    log_path = Path(tempfile.mkdtemp(prefix="rmserve-demo-")) / "server.log"
    console.print(
        f"starting rmserve on 127.0.0.1:{port} with {settings.registry} (log: {log_path})"
    )
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--registry",
                str(settings.registry),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            models = _wait_for_models(client, server, load_timeout_s, log_path)
            if models is None:
                return 1
            _report(client, models, items)
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def _wait_for_models(
    client: httpx.Client, server: subprocess.Popen[bytes], timeout_s: float, log_path: Path
) -> list[dict[str, Any]] | None:
    deadline, shown = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        if server.poll() is not None:
            console.print(
                f"[red]the server exited with code {server.returncode}[/red]; last log lines:"
            )
            console.print("\n".join(log_path.read_text().splitlines()[-30:]), markup=False)
            return None
        try:
            models: list[dict[str, Any]] = client.get("/v1/models").json()["data"]
        except httpx.TransportError:
            time.sleep(0.5)
            continue
        loading = [m["name"] for m in models if m["status"] == "loading"]
        if not loading:
            return models
        status = f"loading: {', '.join(loading)}"
        if status != shown:
            console.print(status)
            shown = status
        time.sleep(1)
    console.print(f"[red]models still loading after {timeout_s:.0f} s[/red]")
    return None


def _report(
    client: httpx.Client, models: list[dict[str, Any]], items: list[dict[str, Any]]
) -> None:
    for model in models:
        if model["status"] != "ready":
            continue
        response = client.post("/v1/score", json={"model": model["name"], "items": items})
        if response.status_code != 200:
            console.print(
                f"[red]{model['name']}: HTTP {response.status_code}[/red] {response.text}"
            )
            continue
        table = Table(title=f"{model['name']} ({model['kind']})")
        for column in ("item", "score", "step scores", "tokens", "error"):
            table.add_column(column)
        for result in response.json()["results"]:
            steps = result.get("step_scores")
            error = result.get("error")
            table.add_row(
                str(result["id"]),
                "" if result["score"] is None else f"{result['score']:.4f}",
                " ".join("-" if s is None else f"{s:.3f}" for s in steps) if steps else "",
                str(result["usage"]["prompt_tokens"]),
                f"{error['type']}: {error['message']}" if error else "",
            )
        console.print(table)
    unavailable = [m for m in models if m["status"] == "unavailable"]
    ready = len(models) - len(unavailable)
    if ready:
        console.print(f"{ready} of {len(models)} models served {len(items)} example trajectories.")
    else:
        console.print(
            f"[yellow]None of the {len(models)} models could be loaded[/yellow], "
            "so no trajectory was scored."
        )
    for model in unavailable:
        console.print(f"[yellow]unavailable[/yellow] {model['name']}: {model['reason']}")
    if unavailable:
        console.print(
            "Without access to a model hub, use local weights (README, 'Local weights'), or try "
            "rmserve on generated tiny models:\n"
            "  .venv/bin/rmserve make-tiny-models /tmp/rm-tiny && "
            "RMSERVE_TINY_MODELS=/tmp/rm-tiny "
            ".venv/bin/rmserve demo --registry tests/registry.tiny.yaml",
            markup=False,
            soft_wrap=True,
        )
