"""`rmserve demo`: start the embedded service, score the example trajectories, print the rewards.

The service runs as a child process on a free loopback port, exactly as `rmserve serve` would;
the demo is an HTTP client of it. Models that cannot load are listed with the reason.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from models.spec import RegistryError, load_registry
from service.config import Settings
from service.launcher import ServerFailed, ServerProcess

console = Console()


def run_demo(settings: Settings, port: int | None, examples: Path, load_timeout_s: float) -> int:
    try:
        load_registry(settings.registry)
        items = [json.loads(line) for line in examples.read_text().splitlines() if line.strip()]
    except (RegistryError, OSError, json.JSONDecodeError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    log_path = Path(tempfile.mkdtemp(prefix="rmserve-demo-")) / "server.log"
    server = ServerProcess(
        settings.registry, log_path, port=port, env={"VLLM_LOGGING_LEVEL": "WARNING"}
    )
    console.print(
        f"started rmserve on {server.base_url} with {settings.registry} (log: {log_path})"
    )
    shown: list[str] = []

    def show(loading: list[str]) -> None:
        if loading != shown:
            console.print(f"loading: {', '.join(loading)}")
            shown[:] = loading

    with server:
        try:
            models = server.wait_settled(load_timeout_s, on_loading=show)
        except ServerFailed as exc:
            console.print(str(exc), style="red", markup=False, highlight=False)
            return 1
        with httpx.Client(base_url=server.base_url, timeout=600) as client:
            _report(client, models, items)
    return 0


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
            ".venv/bin/rmserve demo --registry examples/registry.tiny.yaml",
            markup=False,
            soft_wrap=True,
        )
