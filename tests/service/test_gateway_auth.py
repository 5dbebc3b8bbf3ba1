"""The gateway alone (no engine) on a real loopback port: API keys, settings, models loading."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from pydantic import ValidationError

from models.spec import DiscriminativeSpec
from service.config import Settings
from service.directory import ModelDirectory
from service.gateway import create_app
from service.launcher import free_port
from service.metrics import Metrics
from service.queue import InProcessQueue

KEY = "k" * 24
ITEM = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    """A gateway whose only model is still loading (nothing starts it), served by uvicorn."""
    settings = Settings(api_keys=[KEY, "second-key-0123456789"], port=free_port())
    spec = DiscriminativeSpec(name="rm", kind="discriminative", weights="org/rm")
    app = create_app(settings, InProcessQueue(10), ModelDirectory([spec]), Metrics())
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning")
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{settings.port}"
    server.should_exit = True
    thread.join(10)


def test_v1_requires_a_valid_key(gateway: str) -> None:
    missing = httpx.get(f"{gateway}/v1/models")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "unauthorized"
    wrong = httpx.post(
        f"{gateway}/v1/score",
        json={"model": "rm", "items": [ITEM]},
        headers={"authorization": "Bearer " + "x" * 24},
    )
    assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]["message"]
    for key in (KEY, "second-key-0123456789"):
        ok = httpx.get(f"{gateway}/v1/models", headers={"authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        assert ok.json()["data"][0]["status"] == "loading"


def test_probes_and_metrics_stay_open(gateway: str) -> None:
    assert httpx.get(f"{gateway}/healthz").status_code == 200
    assert httpx.get(f"{gateway}/metrics").status_code == 200
    ready = httpx.get(f"{gateway}/readyz")
    assert ready.status_code == 503 and "still loading: rm" in ready.json()["error"]["message"]


def test_a_loading_model_answers_503_with_retry_after(gateway: str) -> None:
    response = httpx.post(
        f"{gateway}/v1/score",
        json={"model": "rm", "items": [ITEM]},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "10"
    assert "still loading" in response.json()["error"]["message"]


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSERVE_API_KEYS", f"{KEY}, second-key-0123456789")
    monkeypatch.setenv("RMSERVE_MAX_ITEMS_PER_REQUEST", "7")
    settings = Settings()
    assert settings.api_keys == [KEY, "second-key-0123456789"]
    assert settings.max_items_per_request == 7
    assert Settings(max_items_per_request=3).max_items_per_request == 3  # flags override env


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"api_keys": ["short"]}, "at least 16 characters"),
        ({"default_timeout_s": 100, "max_timeout_s": 10}, "exceeds max_timeout_s"),
        ({"port": 70000}, "less than or equal to 65535"),
    ],
)
def test_inconsistent_settings_are_refused(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_cli_reports_bad_settings_without_a_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"RMSERVE_MAX_ITEMS_PER_REQUEST": "0", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert "invalid settings" in done.stderr and "max_items_per_request" in done.stderr
    assert "Traceback" not in done.stderr
