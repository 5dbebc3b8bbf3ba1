"""How rmserve installs: one `rmserve` import root, a client that installs alone, the sidecar from
its own extra, and rmserve working from a directory that has its own `models/` and `service/`.

The fresh virtualenvs install offline: the wheels of the dependencies were fetched by
scripts/install.sh into .venv/wheelhouse; rmserve's own wheels are built here from the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import httpx
import pytest

from rmserve.service.launcher import free_port

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE = REPO / ".venv" / "wheelhouse"
# The repository folders that become subpackages of rmserve (pyproject.toml, package-dir).
MAPPED = ("wire", "web", "sandbox", "models", "service", "examples")
# What the server brings that a trainer's environment must not get from the client.
SERVER_ONLY = {
    "rmserve", "fastapi", "uvicorn", "redis", "prometheus-client", "math-verify", "transformers",
    "torch", "vllm", "sacrebleu", "rouge-score", "nltk", "bm25s", "pillow", "jinja2",
}  # fmt: skip


def _run(*args: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert done.returncode == 0, f"{args}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The server's and the client's wheels, built from this checkout."""
    out = tmp_path_factory.mktemp("wheels")
    for project in (REPO, REPO / "client"):
        _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "-w", out, project)  # fmt: skip
    (server,) = out.glob("rmserve-*.whl")
    (client,) = out.glob("rmserve_client-*.whl")
    return {"server": server, "client": client}


def _fresh_venv(path: Path) -> Path:
    if not WHEELHOUSE.is_dir():
        pytest.fail(f"{WHEELHOUSE} is missing: scripts/install.sh fetches it")
    _run(sys.executable, "-m", "venv", path)
    return path / "bin" / "python"


def _installed(python: Path) -> dict[str, str]:
    listed = json.loads(_run(python, "-m", "pip", "list", "--format", "json"))
    return {d["name"].lower().replace("_", "-"): d["version"] for d in listed}


def _top_level(wheel: Path) -> set[str]:
    return {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}


def test_the_wheels_install_only_under_rmserve(wheels: dict[str, Path]) -> None:
    assert _top_level(wheels["server"]) == {"rmserve", "rmserve-0.1.0.dist-info"}
    assert _top_level(wheels["client"]) == {"rmserve", "rmserve_client-0.1.0.dist-info"}
    server = set(zipfile.ZipFile(wheels["server"]).namelist())
    client = set(zipfile.ZipFile(wheels["client"]).namelist())
    # A namespace package: neither distribution owns rmserve/__init__.py, so neither can
    # overwrite the other's files.
    assert "rmserve/__init__.py" not in server | client
    assert not {n for n in server | client if not n.split("/")[0].endswith(".dist-info")} & (
        server & client
    )
    sources = [
        f"rmserve/{path.relative_to(REPO).as_posix()}"
        for folder in MAPPED
        for path in (REPO / folder).rglob("*")
        if path.suffix in (".py", ".jinja", ".yaml", ".jsonl") and "__pycache__" not in path.parts
    ]
    assert len(sources) > 80 and sorted(set(sources) - server) == []
    assert "rmserve/models/generative/templates/principles_pointwise.jinja" in server
    assert {
        "rmserve/examples/trajectories.jsonl",
        "rmserve/examples/registry.default.yaml",
    } <= server
    assert {"rmserve/client/verl.py", "rmserve/client/cli.py"} <= client


def test_the_client_installs_alone_and_imports_every_adapter(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    python = _fresh_venv(tmp_path / "venv")
    _run(python, "-m", "pip", "install", "-q", "--find-links", WHEELHOUSE, wheels["client"])
    installed = _installed(python)
    assert "rmserve-client" in installed and {"httpx", "pydantic", "tqdm"} <= set(installed)
    assert sorted(SERVER_ONLY & set(installed)) == []
    script = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import rmserve.client
        names = [m.name for m in pkgutil.walk_packages(rmserve.client.__path__, "rmserve.client.")]
        for name in names:
            importlib.import_module(name)
        print(json.dumps({"adapters": names, "modules": sorted(sys.modules)}))
    """)
    report = json.loads(_run(python, "-c", script, cwd=tmp_path))
    assert {"rmserve.client.verl", "rmserve.client.cli", "rmserve.client.client"} <= set(
        report["adapters"]
    )
    assert not [m for m in report["modules"] if m.startswith(("rmserve.service", "rmserve.models"))]
    usage = subprocess.run(
        [tmp_path / "venv" / "bin" / "rmserve-client", "score", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert usage.returncode == 0 and "--model" in usage.stdout


def test_the_client_installs_beside_hydras_antlr_pin(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    """hydra-core / omegaconf (verl's configuration) pin antlr4-python3-runtime 4.9.*; the
    server's math-verify extra wants 4.13.2. The client must not care."""
    python = _fresh_venv(tmp_path / "venv")
    _run(python, "-m", "pip", "install", "-q", "--find-links", WHEELHOUSE,
         "antlr4-python3-runtime==4.9.3", wheels["client"])  # fmt: skip
    _run(python, "-m", "pip", "check")
    assert _installed(python)["antlr4-python3-runtime"] == "4.9.3"
    _run(python, "-c", "import antlr4, rmserve.client.verl")


def test_the_verifiers_install_beside_hydras_antlr_pin(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    """A verifier worker fits a trainer's environment too: math-verify parses with the antlr4
    runtime hydra pins."""
    python = _fresh_venv(tmp_path / "venv")
    verifiers = f"{wheels['server']}[verifiers]"
    _run(python, "-m", "pip", "install", "-q", "--find-links", WHEELHOUSE,
         "antlr4-python3-runtime==4.9.3", wheels["client"], verifiers)  # fmt: skip
    _run(python, "-m", "pip", "check")
    assert _installed(python)["antlr4-python3-runtime"] == "4.9.3"
    script = textwrap.dedent(r"""
        from rmserve.models.verifiers.math import verify_math
        print(verify_math(r"\frac{1}{2}", "0.5").correct, verify_math(r"\sqrt{9}", "4").correct)
    """)
    assert _run(python, "-c", script, cwd=tmp_path).split() == ["True", "False"]


def test_the_sidecar_runs_from_its_own_extra(wheels: dict[str, Path], tmp_path: Path) -> None:
    """The base install imports the gateway; `rmserve[sandbox]` adds what the sidecar needs,
    and it serves tool calls without any model or verifier package."""
    python = _fresh_venv(tmp_path / "venv")
    pip = (python, "-m", "pip", "install", "-q", "--find-links", WHEELHOUSE, wheels["client"])
    _run(*pip, wheels["server"])
    base = _installed(python)
    assert not {"bm25s", "math-verify", "transformers", "vllm", "torch"} & set(base)
    # Every server command starts through the CLI, which imports both runtimes.
    modules = "rmserve.service.cli, rmserve.service.embedded, rmserve.service.distributed"
    _run(python, "-c", f"import {modules}", cwd=tmp_path)
    _run(*pip, f"{wheels['server']}[sandbox]")
    installed = _installed(python)
    assert "bm25s" in installed and not {"math-verify", "transformers", "vllm"} & set(installed)
    port = free_port()
    sidecar = subprocess.Popen(
        [tmp_path / "venv" / "bin" / "rmserve", "sandbox", "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert sidecar.poll() is None, sidecar.communicate()[0]
            subprocess.run(["sleep", "0.1"], check=True)
        else:
            pytest.fail("the sidecar did not become ready")
        answer = httpx.post(
            f"{url}/v1/tools/calculator", json={"arguments": {"expression": "6*7"}}, timeout=30
        )
        assert answer.status_code == 200 and "42" in answer.json()["output"]["text"]
    finally:
        sidecar.terminate()
        sidecar.wait(30)


def test_rmserve_runs_beside_a_project_with_its_own_models_and_service(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    """Research repositories often have `models/` and `service/` packages: run from such a
    directory, rmserve (installed from its wheel) and the project's packages both import."""
    project = tmp_path / "project"
    for package in ("models", "service", "sandbox"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f"OWNER = 'project {package}'\n")
    (project / "models" / "spec.py").write_text("KIND = 'the project own spec'\n")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    # The wheels go into the new venv; their dependencies come from the test environment's
    # site-packages as a plain path entry (its .pth files, the editable install's hooks among
    # them, are not processed).
    site = Path(sysconfig.get_path("purelib"))
    python = venv / "bin" / "python"
    target = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"))
    target = Path(str(target).strip())
    (target / "deps.pth").write_text(f"{site}\n")
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
         wheels["server"], wheels["client"])  # fmt: skip
    script = textwrap.dedent("""
        import models, models.spec, service, sandbox
        import rmserve.models.spec, rmserve.service.gateway, rmserve.sandbox.tools
        from rmserve.examples import DEFAULT_REGISTRY
        registry = rmserve.models.spec.load_registry(DEFAULT_REGISTRY)
        print(models.OWNER, "|", models.spec.KIND, "|", service.OWNER, "|", sandbox.OWNER)
        print(rmserve.models.spec.__file__)
        print(sorted(registry.models))
    """)
    out = _run(python, "-c", script, cwd=project).splitlines()
    assert out[0] == "project models | the project own spec | project service | project sandbox"
    assert out[1].startswith(str(target)), out[1]
    assert "math" in out[2] and "unit-tests" in out[2]
    listed = _run(python, "-m", "rmserve.service.cli", "check-registry", "default", cwd=project)
    assert "math\tmath" in listed
