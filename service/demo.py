"""`rmserve demo`: start the embedded service, score the example trajectories, print the rewards.

The service runs as a child process on a free loopback port, exactly as `rmserve serve` would;
the demo is an HTTP client of it. Every ready model scores every example (streamed, so the
progress bar moves as items finish); the rewards are printed as one table, an item a model does
not apply to shows the error it gave (`missing_reference`, say), and models that could not load
are listed with the reason.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rmserve.models.spec import RegistryError, load_registry
from rmserve.service.config import Settings
from rmserve.service.launcher import ServerFailed, ServerProcess

console = Console()


@dataclass
class ModelRun:
    """One model's results over the examples, by item index, or why the request failed."""

    name: str
    kind: str
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    failure: str | None = None


def run_demo(settings: Settings, port: int | None, examples: Path, load_timeout_s: float) -> int:
    """0 when at least one model scored the examples, 1 when none could, 2 for bad input."""
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
        f"started rmserve on {server.base_url} with {settings.registry} (log: {log_path})",
        highlight=False,
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
        ready = [m for m in models if m["status"] == "ready"]
        with httpx.Client(base_url=server.base_url, timeout=600) as client:
            runs = _score_all(client, ready, items)
    _print_rewards(runs, items)
    return _summary(models, runs, items)


def _score_all(
    client: httpx.Client, models: list[dict[str, Any]], items: list[dict[str, Any]]
) -> list[ModelRun]:
    runs = [ModelRun(model["name"], model["kind"]) for model in models]
    columns = (
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        for run in runs:
            task = progress.add_task(run.name, total=len(items))
            try:
                for result in _stream(client, run.name, items):
                    run.results[result["index"]] = result
                    progress.advance(task)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                run.failure = f"{type(exc).__name__}: {exc}"
    return runs


def _stream(
    client: httpx.Client, model: str, items: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """The model's results as the service streams them (NDJSON, in finishing order)."""
    body = {"model": model, "items": items, "options": {"stream": True}}
    with client.stream("POST", "/v1/score", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise ValueError(f"HTTP {response.status_code}: {response.text}")
        for line in response.iter_lines():
            if line.strip():
                yield json.loads(line)


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "[red]no result[/red]"
    error = result.get("error")
    if error:
        return f"[dim]{error['type']}[/dim]"
    score = result.get("score")
    text = "-" if score is None else f"{score:.3f}"
    steps = result.get("step_scores")
    if steps:
        text += (
            " [dim]steps " + " ".join("-" if s is None else f"{s:.2f}" for s in steps) + "[/dim]"
        )
    return text


def _print_rewards(runs: list[ModelRun], items: list[dict[str, Any]]) -> None:
    scored = [run for run in runs if run.failure is None]
    if not scored:
        return
    table = Table(title="rewards of the example trajectories")
    table.add_column("item")
    for run in scored:
        table.add_column(f"{run.name}\n[dim]{run.kind}[/dim]", justify="right")
    for index, item in enumerate(items):
        row = [str(item.get("id") or f"line {index + 1}")]
        table.add_row(*row, *(_cell(run.results.get(index)) for run in scored))
    console.print(table)
    explained: dict[str, str] = {}
    for run in scored:
        for result in run.results.values():
            error = result.get("error")
            if error and error["type"] not in explained:
                explained[error["type"]] = f"{error['message']} ({run.name})"
    for type_, message in explained.items():
        console.print(f"[dim]{type_}[/dim]: {message}", highlight=False)


def _summary(
    models: list[dict[str, Any]], runs: list[ModelRun], items: list[dict[str, Any]]
) -> int:
    served = [run for run in runs if run.failure is None]
    for run in runs:
        if run.failure is not None:
            console.print(f"[red]{run.name} failed:[/red] {run.failure}", highlight=False)
    if served:
        console.print(
            f"{len(served)} of {len(models)} models scored {len(items)} example trajectories."
        )
    else:
        console.print(f"[red]None of the {len(models)} models could score the examples.[/red]")
    unavailable = [m for m in models if m["status"] == "unavailable"]
    for model in unavailable:
        console.print(
            f"[yellow]unavailable[/yellow] {model['name']}: {model['reason']}", highlight=False
        )
    if unavailable:
        console.print(
            "Models from a hub need access to it (or local weights: README, 'Local weights'). "
            "To run the model pipeline offline on generated tiny models (random scores):\n"
            "  rmserve make-tiny-models /tmp/rm-tiny && "
            "RMSERVE_TINY_MODELS=/tmp/rm-tiny rmserve demo --registry tiny",
            markup=False,
            soft_wrap=True,
        )
    return 0 if served else 1
