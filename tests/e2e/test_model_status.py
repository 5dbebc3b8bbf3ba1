"""A model that cannot load is reported with its reason; the others keep serving."""

from __future__ import annotations

import httpx

OK_ITEM = {
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
}


def test_models_lists_status_and_reason(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {
        "tiny-rm",
        "tiny-rm-truncating",
        "tiny-prm",
        "tiny-prm-turns",
        "missing-weights",
        "broken-config",
        "too-big-kv-cache",
    }
    assert models["tiny-prm"]["status"] == "ready" and models["tiny-prm"]["kind"] == "process"
    missing = models["missing-weights"]
    assert missing["status"] == "unavailable"
    assert "/nonexistent/rmserve-test/missing-model does not exist" in missing["reason"]
    broken = models["broken-config"]
    assert broken["status"] == "unavailable"
    assert "broken-config" in broken["reason"]
    too_big = models["too-big-kv-cache"]
    assert too_big["status"] == "unavailable"
    assert "too little memory" in too_big["reason"] and "kv_cache_gib 4096" in too_big["reason"]


def test_requests_to_an_unavailable_model_get_503_with_the_reason(client: httpx.Client) -> None:
    response = client.post("/v1/score", json={"model": "missing-weights", "items": [OK_ITEM]})
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["param"] == "model"
    assert "unavailable" in error["message"] and "does not exist" in error["message"]
    assert (
        client.post("/v1/score", json={"model": "tiny-rm", "items": [OK_ITEM]}).status_code == 200
    )


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"]["missing-weights"] == "unavailable"
    assert ready.json()["models"]["tiny-rm"] == "ready"


def test_metrics_count_requests_and_jobs(client: httpx.Client) -> None:
    client.post("/v1/score", json={"model": "tiny-rm", "items": [OK_ITEM, OK_ITEM]})
    text = client.get("/metrics").text
    assert 'rmserve_http_requests_total{code="200",route="/v1/score"}' in text
    assert 'rmserve_jobs_total{model="tiny-rm",outcome="ok"}' in text
    assert 'rmserve_model_ready{model="missing-weights"} 0.0' in text


def test_openapi_documents_the_api(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/score", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
