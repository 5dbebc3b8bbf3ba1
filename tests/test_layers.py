"""The package's layers import in one direction, without cycles, and each process loads only
what it needs.

    rmserve.wire      the wire vocabulary: trajectories, documents, errors, the tool protocol
    rmserve.web       what every HTTP server shares (error envelope handlers, middleware, metrics)
    rmserve.sandbox   the tools                          (wire, web)
    rmserve.models    the reward models and verifiers    (wire)
    rmserve.service   gateway, queue, workers, CLI       (everything, and the client)
    rmserve.client    its own distribution               (nothing of the server)

Every import counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "wire": REPO / "wire",
    "web": REPO / "web",
    "sandbox": REPO / "sandbox",
    "models": REPO / "models",
    "service": REPO / "service",
    "examples": REPO / "examples",
    "client": REPO / "client" / "src" / "rmserve" / "client",
}
ALLOWED = {
    "wire": {"wire"},
    "web": {"wire", "web"},
    "sandbox": {"wire", "web", "sandbox"},
    "models": {"wire", "models"},
    "service": {"wire", "web", "sandbox", "models", "service", "examples", "client"},
    "examples": {"examples"},
    "client": {"client"},
}


def _modules() -> Iterator[tuple[str, Path]]:
    for layer, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(["rmserve", layer, *parts]), path


MODULES = dict(_modules())


def _imports(name: str, path: Path) -> set[str]:
    """The rmserve modules `name` imports (a package import counts as its __init__)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_layers_are_found() -> None:
    assert len(MODULES) > 80
    assert "rmserve.wire.trajectory" in GRAPH["rmserve.service.protocol"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name.split(".")[1] == layer
        for target in targets
        if target.split(".")[1] not in ALLOWED[layer]
    )
    assert wrong == []


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between modules (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                component.append(member)
            component.append(node)
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert cycles == []


def _loaded_by(module: str) -> list[str]:
    script = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


HEAVY = ("transformers", "torch", "vllm", "math_verify", "sacrebleu", "rouge_score", "nltk")


def test_the_gateway_loads_no_verifier_sandbox_runner_or_model_library() -> None:
    loaded = _loaded_by("rmserve.service.gateway")
    assert "rmserve.service.gateway" in loaded
    wrong = [
        m
        for m in loaded
        if m.split(".")[0] in (*HEAVY, "numpy", "bm25s")
        or m.startswith(("rmserve.models.verifiers", "rmserve.sandbox", "rmserve.models.loader"))
    ]
    assert wrong == []


def test_the_sidecar_loads_nothing_of_the_models_or_the_service() -> None:
    loaded = _loaded_by("rmserve.sandbox.app")
    wrong = [
        m
        for m in loaded
        if m.split(".")[0] in HEAVY or m.startswith(("rmserve.models", "rmserve.service"))
    ]
    assert wrong == []


def test_parsing_a_request_loads_no_sandbox_runner() -> None:
    loaded = _loaded_by("rmserve.service.protocol")
    assert [m for m in loaded if m.startswith("rmserve.sandbox")] == []
