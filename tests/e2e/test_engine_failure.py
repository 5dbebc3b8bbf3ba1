"""When a model's engine dies, that model leaves service with the reason; the rest serve on."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import start_server

ITEM = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_engine_death_takes_only_that_model_out(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    engine = "engine: {max_model_len: 256, dtype: float32, kv_cache_gib: 0.1, enforce_eager: true}"
    registry = tmp_path / "registry.yaml"
    weights = tiny_models["tiny-rm"]
    registry.write_text(
        "models:\n"
        + "".join(
            f"  {name}:\n    kind: discriminative\n    weights: {weights}\n    {engine}\n"
            for name in ("first", "second")
        )
    )
    with start_server(registry, tmp_path, {"VLLM_LOGGING_LEVEL": "WARNING"}) as server:
        models = {m["name"]: m for m in httpx.get(server.base_url + "/v1/models").json()["data"]}
        assert all(m["status"] == "ready" for m in models.values())
        with httpx.Client(base_url=server.base_url, timeout=60) as client:
            before = client.post("/v1/score", json={"model": "first", "items": [ITEM]}).json()
            assert before["results"][0]["error"] is None
            # Models load in registry order: the oldest engine-core process is "first"'s.
            cores = [
                p
                for p in psutil.Process(server.process.pid).children(recursive=True)
                if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
            ]
            assert len(cores) == 2, [(p.pid, p.name(), p.cmdline()) for p in cores]
            min(cores, key=lambda p: p.create_time()).kill()

            deadline, response = time.monotonic() + 60, None
            while time.monotonic() < deadline:
                response = client.post("/v1/score", json={"model": "first", "items": [ITEM] * 3})
                if response.status_code == 503:
                    break
                # Until the failure is seen, items fail one by one with a clear error, no hang.
                assert response.status_code == 200
                for result in response.json()["results"]:
                    assert result["error"] is None or result["error"]["type"] in (
                        "internal_error",
                        "unavailable",
                    )
                time.sleep(0.5)
            assert response is not None and response.status_code == 503, response
            assert "engine died" in response.json()["error"]["message"]
            models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
            assert models["first"]["status"] == "unavailable"
            assert models["second"]["status"] == "ready"
            after = client.post("/v1/score", json={"model": "second", "items": [ITEM]}).json()
            assert after["results"][0]["error"] is None
            assert server.process.poll() is None
