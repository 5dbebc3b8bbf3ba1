"""Virtualenvs of real trainers (verl, ...), built once and cached outside the clone.

A trainer's environment holds the trainer and the rmserve client only (`pip install ./client`,
never the server), as a user installs them. It lives in `TRAINER_VENVS/NAME-HASH`
(~/.cache/rmserve/trainer-venvs, or $RMSERVE_TRAINER_VENVS), where HASH covers the Python
version, the requirements and `client/pyproject.toml` (the client's dependencies): a CI run on a
clean clone of the same revision reuses it. It is built into a temporary directory beside it and
renamed into place once complete, under a file lock, so that parallel pytest sessions build it
once and never see half of it. Run its interpreter as `bin/python` (the scripts pip wrote keep
the temporary path in their shebangs).

The client's *code* is not part of the hash (a changed adapter would otherwise cost a rebuild of
several minutes): `client_env()` puts the checkout's `client/src` first on PYTHONPATH, so the
code under test is always the checkout's, over the copy installed when the venv was built (Ray
workers that a driver starts inherit the variable).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client"
TRAINER_VENVS = Path(
    os.environ.get("RMSERVE_TRAINER_VENVS") or Path.home() / ".cache" / "rmserve" / "trainer-venvs"
)
# Bump to rebuild every cached venv (a change in how they are built).
LAYOUT = "1"
# A venv of the same NAME unused for this long is removed when a new one is built.
STALE_S = 7 * 24 * 3600
READY = ".rmserve-ready"


class VenvBuildFailed(RuntimeError):
    """pip could not install the trainer's requirements."""


def venv_key(name: str, requirements: Sequence[str], no_deps: Sequence[str] = ()) -> str:
    """`NAME-HASH` of a trainer venv: Python version, requirements, client/pyproject.toml."""
    digest = hashlib.sha256(
        json.dumps([LAYOUT, sys.version, *requirements, "|", *no_deps]).encode()
    )
    digest.update((CLIENT / "pyproject.toml").read_bytes())
    return f"{name}-{digest.hexdigest()[:16]}"


def trainer_venv(
    name: str,
    requirements: Sequence[str],
    *,
    no_deps: Sequence[str] = (),
    timeout_s: float = 1800,
) -> tuple[Path, float]:
    """The cached venv of `no_deps` (installed without their dependencies, e.g. a trainer whose
    own pins cannot install on CPU), `requirements` and `./client`, built when missing; also the
    seconds spent building it (0.0 when it was there)."""
    final = TRAINER_VENVS / venv_key(name, requirements, no_deps)
    if _ready(final):
        _touch(final)
        return final, 0.0
    TRAINER_VENVS.mkdir(parents=True, exist_ok=True)
    with open(TRAINER_VENVS / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _ready(final):  # another session built it meanwhile
            _touch(final)
            return final, 0.0
        started = time.monotonic()
        shutil.rmtree(final, ignore_errors=True)  # left by a build that died before its rename
        building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=TRAINER_VENVS))
        try:
            _build(building, requirements, no_deps, timeout_s)
            building.rename(final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        _prune(name, keep=final)
        return final, time.monotonic() - started


def client_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with the checkout's client code first on
    PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    rest = env.get("PYTHONPATH")
    src = str(CLIENT / "src")
    env["PYTHONPATH"] = f"{src}{os.pathsep}{rest}" if rest else src
    return env


def _build(
    venv: Path, requirements: Sequence[str], no_deps: Sequence[str], timeout_s: float
) -> None:
    # sys.executable may be a venv's; `-m venv` bases the new one on the base interpreter.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    if no_deps:
        _pip(venv, ["--no-deps", *no_deps], timeout_s)
    _pip(venv, [*requirements, str(CLIENT)], timeout_s)
    record = {"requirements": list(requirements), "no_deps": list(no_deps)}
    (venv / READY).write_text(json.dumps(record))


def _pip(venv: Path, args: Sequence[str], timeout_s: float) -> None:
    command = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise VenvBuildFailed(
            f"pip install {' '.join(args)} failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )


def _ready(venv: Path) -> bool:
    return (venv / READY).is_file() and (venv / "bin" / "python").exists()


def _touch(venv: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache is still usable
        (venv / READY).touch()


def _prune(name: str, keep: Path) -> None:
    """Remove other venvs of `name` (older hashes) that nobody used for STALE_S."""
    now = time.time()
    for other in TRAINER_VENVS.glob(f"{name}-*"):
        marker = other / READY
        if other == keep or not other.is_dir() or not marker.is_file():
            continue
        if now - marker.stat().st_mtime > STALE_S:
            shutil.rmtree(other, ignore_errors=True)
