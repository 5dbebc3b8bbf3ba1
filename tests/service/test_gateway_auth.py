"""API keys on the gateway alone (no engine), on a real loopback port: the keys file, 401 and 403,
models per key, batches per key, `rmserve api-key`, and settings."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI
from pydantic import ValidationError

from rmserve.models.spec import DiscriminativeSpec
from rmserve.service.auth import KeysFileError, hash_key, load_keys, new_key
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.gateway import create_app
from rmserve.service.launcher import free_port
from rmserve.service.metrics import Metrics
from rmserve.service.queue import InProcessQueue
from rmserve.service.quotas import Quota

ADMIN, TEAM_A = new_key(), new_key()
# A key (the keys file holds any string's digest) with characters a URL's user info must encode.
ODD = "odd key:with@/,%?#chars-" + new_key()[4:]
ITEM = {"messages": [{"role": "user", "content": "hi"}]}
MODELS = ("rm", "rm2", "ready")


def keys_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def entry(name: str, key: str, models: str = "['*']") -> str:
    return f"  - {{name: {name}, sha256: {hash_key(key)}, models: {models}}}\n"


def gateway_app(settings: Settings) -> FastAPI:
    """Models rm and rm2 still loading (nothing starts them), `ready` ready with no worker."""
    specs = [DiscriminativeSpec(name=n, kind="discriminative", weights=f"org/{n}") for n in MODELS]
    directory = ModelDirectory(specs)
    directory.mark_ready("ready")
    return create_app(settings, InProcessQueue(100), directory, Metrics())


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """The app on a loopback port (uvicorn in a thread); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = keys_file(
        tmp_path_factory.mktemp("keys") / "keys.yaml",
        "keys:\n"
        + entry("admin", ADMIN)
        + entry("team-a", TEAM_A, "[rm, ready]")
        + entry("odd", ODD, "[ready]"),
    )
    with serving(gateway_app(Settings(api_keys_file=path))) as url:
        yield url


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def counter(base_url: str, name: str, label: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    match = re.search(rf'^{name}\{{[a-z]+="{label}"\}} (\S+)$', text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


# -- 401 -----------------------------------------------------------------------------------------


BASIC = 'Basic realm="rmserve"'
MALFORMED_BASIC = "malformed Authorization header: Basic credentials"


def basic(credentials: bytes) -> dict[str, str]:
    return {"authorization": f"Basic {base64.b64encode(credentials).decode()}"}


@pytest.mark.parametrize(
    ("headers", "challenge", "says"),
    [
        ({}, f"Bearer, {BASIC}", "missing API key: send the header 'Authorization: Bearer <key>'"
         ", or Basic credentials with the key as the password (a URL's http://NAME:KEY@host)"),
        ({"authorization": f"Token {ADMIN}"}, f'Bearer error="invalid_request", {BASIC}',
         "malformed Authorization header: expected 'Bearer <key>' or 'Basic base64(NAME:KEY)'"),
        ({"authorization": "Bearer"}, f'Bearer error="invalid_request", {BASIC}', "malformed"),
        ({"authorization": "Bearer a b"}, f'Bearer error="invalid_request", {BASIC}', "malformed"),
        (bearer("rms_" + "x" * 43), f'Bearer error="invalid_token", {BASIC}', "invalid API key"),
        (bearer(hash_key(ADMIN)), f'Bearer error="invalid_token", {BASIC}', "invalid API key"),
        # Basic: the key in the password; each malformation named (never echoing the header).
        ({"authorization": "Basic"}, f"Bearer, {BASIC}", f"{MALFORMED_BASIC} must be one base64"),
        ({"authorization": "Basic YTpi YTpi"}, f"Bearer, {BASIC}", "must be one base64 token"),
        ({"authorization": f"Basic {ADMIN}"}, f"Bearer, {BASIC}",  # the key, not base64(user:key)
         f"{MALFORMED_BASIC} are not valid base64"),
        ({"authorization": "Basic YWRtaW46eA"}, f"Bearer, {BASIC}", "not valid base64"),  # padding
        (basic(b"admin:\xff" + ADMIN.encode()), f"Bearer, {BASIC}",
         f"{MALFORMED_BASIC} are not UTF-8 once decoded"),
        (basic(ADMIN.encode()), f"Bearer, {BASIC}",
         f"{MALFORMED_BASIC} have no ':' between the user and the key"),
        (basic(f"{ADMIN}:".encode()), f"Bearer, {BASIC}",  # http://KEY@host: the key as the user
         f"{MALFORMED_BASIC} have an empty password: the API key goes in the password "
         "(NAME:KEY; in a URL, http://NAME:KEY@host)"),
        (basic(f"admin:{ADMIN}x".encode()), f"Bearer, {BASIC}", "invalid API key"),
        (basic(f"admin:{hash_key(ADMIN)}".encode()), f"Bearer, {BASIC}", "invalid API key"),
    ],
)  # fmt: skip
def test_a_missing_malformed_or_unknown_key_is_401(
    gateway: str, headers: dict[str, str], challenge: str, says: str
) -> None:
    before = counter(gateway, "rmserve_auth_failures_total", "unauthorized")
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/score"), ("POST", "/get_reward"),
                         ("GET", "/v1/jobs/batch-x"), ("POST", "/v1/jobs")]:  # fmt: skip
        response = httpx.request(method, f"{gateway}{path}", headers=headers, json={})
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == challenge
        error = response.json()["error"]
        assert error["type"] == "unauthorized" and says in error["message"]
        assert ADMIN not in response.text and ADMIN[4:20] not in response.text
    assert counter(gateway, "rmserve_auth_failures_total", "unauthorized") == before + 5


def test_probes_and_metrics_stay_open(gateway: str) -> None:
    assert httpx.get(f"{gateway}/healthz").status_code == 200
    assert httpx.get(f"{gateway}/metrics").status_code == 200
    ready = httpx.get(f"{gateway}/readyz")
    assert ready.status_code == 503 and "still loading: rm, rm2" in ready.json()["error"]["message"]


# -- Basic credentials from a URL's user info (OpenRLHF) ----------------------------------------
# OpenRLHF has no auth or header options (v0.11.0, commit 3c3be6234e0cb353e76bb8019947db9dfe99fca7,
# openrlhf/utils/agent.py:338-353: `session.post(url, json=data)` on a new aiohttp.ClientSession):
# the key can only ride in the URL, `--reward.remote_url http://NAME:KEY@host:8000/get_reward`,
# which aiohttp sends as `Authorization: Basic base64(NAME:KEY)` (ClientRequest.update_host:
# `if url.raw_user or url.raw_password: self.auth = BasicAuth(url.user or "", url.password or "")`).


async def aiohttp_call(url: str, json: dict[str, Any] | None = None) -> tuple[int, Any]:
    """GET (or POST `json`) with a real aiohttp client, as OpenRLHF calls: a fresh session."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        method = session.get if json is None else session.post
        async with method(url, json=json) as response:
            return response.status, await response.json()


def with_user_info(base_url: str, user_info: str, path: str) -> str:
    return base_url.replace("http://", f"http://{user_info}@", 1) + path


async def test_a_url_with_the_key_as_password_authenticates_with_basic(gateway: str) -> None:
    async def models(user_info: str) -> list[str]:
        status, body = await aiohttp_call(with_user_info(gateway, user_info, "/v1/models"))
        assert status == 200, body
        return [model["name"] for model in body["data"]]

    assert await models(f"team-a:{TEAM_A}") == ["rm", "ready"]
    assert await models(f"admin:{ADMIN}") == ["rm", "rm2", "ready"]
    # The user part is not checked: the key alone says who calls (another key's name, none).
    assert await models(f"admin:{TEAM_A}") == ["rm", "ready"]
    assert await models(f":{TEAM_A}") == ["rm", "ready"]

    status, body = await aiohttp_call(f"{gateway}/v1/models")  # no user info: no header
    assert status == 401 and body["error"]["message"].startswith("missing API key")
    status, body = await aiohttp_call(with_user_info(gateway, TEAM_A, "/v1/models"))
    assert status == 401 and "empty password: the API key goes in the password" in str(body)
    assert TEAM_A not in str(body)
    status, body = await aiohttp_call(with_user_info(gateway, f"team-a:{TEAM_A}x", "/v1/models"))
    assert status == 401 and body["error"]["message"] == "invalid API key"


async def test_openrlhfs_request_with_user_info_passes_auth_to_the_model_checks(
    gateway: str,
) -> None:
    # The per-sample body of agent.py:287 and 331-336 (one query, its prompt and label).
    sample = {"query": ["Q: 2+2? A: \\boxed{4}"], "prompts": ["Q: 2+2? A:"], "labels": ["4"]}
    url = with_user_info(gateway, f"team-a:{TEAM_A}", "/get_reward?model={}")
    status, body = await aiohttp_call(url.format("rm2"), sample)
    assert status == 403, body  # authenticated as team-a, which may not use rm2
    assert body["error"]["message"] == "key 'team-a' may not use model 'rm2'; allowed: ready, rm"
    status, body = await aiohttp_call(url.format("rm"), sample)
    assert status == 503 and "loading" in body["error"]["message"]  # admitted; rm is loading


async def test_a_key_with_url_special_characters_is_percent_encoded_in_the_url(
    gateway: str,
) -> None:
    # OpenRLHF splits --reward.remote_url on commas (several reward servers; v0.11.0,
    # openrlhf/cli/train_ppo_ray.py:630), so a ',' of the
    # key must be encoded as %2C like the other characters; aiohttp decodes the password.
    remote_url = with_user_info(gateway, f"odd:{quote(ODD, safe='')}", "/v1/models")
    assert "," not in remote_url and "%2C" in remote_url
    (url,) = remote_url.split(",")
    status, body = await aiohttp_call(url)
    assert status == 200, body
    assert [model["name"] for model in body["data"]] == ["ready"]
    unencoded = with_user_info(gateway, f"odd:{ODD}", "/v1/models")
    assert len(unencoded.split(",")) == 2  # what OpenRLHF would make of it: two broken URLs


# -- 403 and models per key ----------------------------------------------------------------------


def test_a_key_sees_only_its_models(gateway: str) -> None:
    def names(key: str) -> list[str]:
        response = httpx.get(f"{gateway}/v1/models", headers=bearer(key))
        assert response.status_code == 200
        return [model["name"] for model in response.json()["data"]]

    assert names(ADMIN) == ["rm", "rm2", "ready"]
    assert names(TEAM_A) == ["rm", "ready"]


def test_a_model_the_key_may_not_use_is_403_naming_key_and_model(gateway: str) -> None:
    before = counter(gateway, "rmserve_auth_failures_total", "forbidden")
    grader = {"type": "score_model", "name": "g", "model": "rm2",
              "input": [{"role": "user", "content": "{{ sample.output_text }}"}]}  # fmt: skip
    subgraders = {"a": {**grader, "model": "rm", "name": "a"}, "b": {**grader, "name": "b"}}
    multi = {"type": "multi", "name": "m", "calculate_output": "a + b", "graders": subgraders}
    calls: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/score", {"model": "rm2", "items": [ITEM]}, "model"),
        ("/v1/score", {"model": "rm2", "items": [ITEM], "options": {"stream": True}}, "model"),
        ("/v1/jobs", {"model": "rm2", "items": [ITEM]}, "model"),
        ("/v1/score", {"model": "no-such-model", "items": [ITEM]}, "model"),
        ("/get_reward?model=rm2", {"query": ["q"]}, "model"),
        ("/v1/fine_tuning/alpha/graders/validate", {"grader": grader}, "grader.model"),
        ("/v1/fine_tuning/alpha/graders/run", {"grader": multi, "model_sample": "x"},
         "grader.model"),
    ]  # fmt: skip
    for path, body, param in calls:
        response = httpx.post(f"{gateway}{path}", json=body, headers=bearer(TEAM_A))
        assert response.status_code == 403, (path, response.text)
        error = response.json()["error"]
        assert error["type"] == "forbidden" and error["param"] == param
        model = body.get("model", "rm2")
        assert error["message"] == (
            f"key 'team-a' may not use model {model!r}; allowed: ready, rm"
        ), path
    assert counter(gateway, "rmserve_auth_failures_total", "forbidden") == before + len(calls)

    # The same requests with a model the key may use pass the checks (rm is still loading).
    allowed = httpx.post(
        f"{gateway}/v1/score", json={"model": "rm", "items": [ITEM]}, headers=bearer(TEAM_A)
    )
    assert allowed.status_code == 503 and allowed.headers["retry-after"] == "10"
    grader["model"] = "ready"
    valid = httpx.post(
        f"{gateway}/v1/fine_tuning/alpha/graders/validate",
        json={"grader": grader},
        headers=bearer(TEAM_A),
    )
    assert valid.status_code == 200, valid.text
    admin = httpx.post(
        f"{gateway}/v1/score", json={"model": "rm2", "items": [ITEM]}, headers=bearer(ADMIN)
    )
    assert admin.status_code == 503  # every model, and rm2 is loading


def test_a_batch_is_visible_only_to_the_key_that_started_it(gateway: str) -> None:
    started = httpx.post(
        f"{gateway}/v1/jobs", json={"model": "ready", "items": [ITEM] * 2}, headers=bearer(TEAM_A)
    )
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    mine = httpx.get(f"{gateway}{location}", headers=bearer(TEAM_A))
    assert mine.status_code == 200 and mine.json()["status"] == "running"
    for path in (location, f"{location}/stream"):
        other = httpx.get(f"{gateway}{path}", headers=bearer(ADMIN))
        assert other.status_code == 404, other.text
        assert other.json()["error"]["message"].startswith("no batch ")


# -- the keys file -------------------------------------------------------------------------------

DIGEST = hash_key("k")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("keys: [", "not valid YAML"),
        ("[]", "the file: Input should be a valid dictionary"),
        ("keys: []", "keys: List should have at least 1 item"),
        ("kees: []", "kees: Extra inputs are not permitted"),
        (f"keys:\n  - {{name: a, sha256: {DIGEST}}}\n  - {{name: team-b, sha256: abc}}\n",
         "keys[1] ('team-b').sha256: Value error, must be the 64 hex digits"),
        (f"keys:\n  - {{name: a, sha256: {DIGEST}, modles: [x]}}\n",
         "keys[0] ('a').modles: Extra inputs are not permitted"),
        (f"keys:\n  - {{name: a b, sha256: {DIGEST}}}\n", "keys[0] ('a b').name: String should"),
        (f"keys:\n  - {{sha256: {DIGEST}}}\n", "keys[0].name: Field required"),
        (f"keys:\n  - {{name: anonymous, sha256: {DIGEST}}}\n", "'anonymous' is reserved"),
        (f"keys:\n  - {{name: a, sha256: {DIGEST}, models: []}}\n", "keys[0] ('a').models: List"),
        (f"keys:\n  - {{name: a, sha256: {DIGEST}, requests_per_s: 0}}\n",
         "keys[0] ('a').requests_per_s: Input should be greater than 0"),
        (f"keys:\n  - {{name: a, sha256: {DIGEST}, burst: 5}}\n",
         "keys[0] ('a'): burst: needs requests_per_s"),
        ("defaults: {max_concurrent_items: -1}\nkeys: []\n",
         "defaults.max_concurrent_items: Input should be greater than or equal to 1"),
        (f"keys:\n  - {{name: a, sha256: {DIGEST}}}\n  - {{name: a, sha256: {hash_key('j')}}}\n",
         "keys[1] ('a').name: keys[0] has the same name"),
        (f"keys:\n  - {{name: a, sha256: {DIGEST}}}\n  - {{name: b, sha256: {DIGEST.upper()}}}\n",
         "keys[1] ('b').sha256: the same key as 'a'"),
    ],
)  # fmt: skip
def test_the_keys_file_is_validated_naming_entry_and_field(
    tmp_path: Path, text: str, says: str
) -> None:
    path = keys_file(tmp_path / "keys.yaml", text)
    with pytest.raises(KeysFileError, match=re.escape(says)) as raised:
        load_keys(path)
    assert str(raised.value).startswith(f"keys file {path}: ")
    with pytest.raises(ValidationError, match=re.escape(says)):
        Settings(api_keys_file=path)


def test_a_key_pasted_into_the_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    key = new_key()
    path = keys_file(tmp_path / "keys.yaml", f"keys:\n  - {{name: a, sha256: '{key}'}}\n")
    with pytest.raises(KeysFileError, match=r"keys\[0\] \('a'\)\.sha256: .*not its SHA-256") as e:
        load_keys(path)
    assert key not in str(e.value) and key[4:] not in str(e.value)


def test_a_keys_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"(?s)api_keys_file.*does not point to a file"):
        Settings(api_keys_file=tmp_path / "nowhere.yaml")


def test_quota_fields_come_from_the_entry_else_the_defaults(tmp_path: Path) -> None:
    path = keys_file(
        tmp_path / "keys.yaml",
        "defaults: {requests_per_s: 10, burst: 20, max_concurrent_items: 100}\n"
        f"keys:\n  - {{name: plain, sha256: {hash_key('1')}}}\n"
        f"  - {{name: slow, sha256: {hash_key('2')}, requests_per_s: 0.5, burst: null}}\n"
        f"  - {{name: free, sha256: {hash_key('3')}, requests_per_s: null,"
        " max_concurrent_items: null, models: [a, '*']}\n",
    )
    keys = {key.name: key for key in load_keys(path).values()}
    assert keys["plain"].quota == Quota(10, 20, 100)
    assert keys["slow"].quota == Quota(0.5, 1, 100)  # burst: the rate, at least 1
    assert keys["free"].quota == Quota() and not keys["free"].quota.limited
    assert keys["free"].models is None and keys["plain"].models is None  # every model
    assert load_keys(path)[hash_key("2")].name == "slow"


def test_auth_is_off_without_a_keys_file_and_the_gateway_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="rmserve.service.auth"):
        app = gateway_app(Settings())
    assert "authentication is off" in caplog.text and "/v1/*" in caplog.text
    with serving(app) as url:
        models = httpx.get(f"{url}/v1/models")
        assert models.status_code == 200 and len(models.json()["data"]) == 3
        started = httpx.post(f"{url}/v1/jobs", json={"model": "ready", "items": [ITEM]})
        assert httpx.get(f"{url}{started.headers['location']}").status_code == 200


# -- rmserve api-key -----------------------------------------------------------------------------


def api_key_command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rmserve.service.cli", "api-key", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_rmserve_api_key_prints_a_key_that_its_entry_authenticates(tmp_path: Path) -> None:
    made = api_key_command("team-c", "--models", "ready, rm2", "--requests-per-s", "5")
    assert made.returncode == 0, made.stderr
    (key,) = re.findall(r"^(rms_[A-Za-z0-9_-]{43})$", made.stdout, re.MULTILINE)
    entries = yaml.safe_load(made.stdout.split("`keys:` list:", 1)[1])
    assert entries == [
        {"name": "team-c", "sha256": hash_key(key), "models": ["ready", "rm2"],
         "requests_per_s": 5.0}
    ]  # fmt: skip
    assert made.stdout.count(key) == 1  # printed once; the entry holds only its digest

    path = keys_file(tmp_path / "keys.yaml", yaml.safe_dump({"keys": entries}))
    with serving(gateway_app(Settings(api_keys_file=path))) as url:
        listed = httpx.get(f"{url}/v1/models", headers=bearer(key))
        assert listed.status_code == 200, listed.text
        assert [m["name"] for m in listed.json()["data"]] == ["rm2", "ready"]
        assert httpx.get(f"{url}/v1/models", headers=bearer(key + "x")).status_code == 401

    other = api_key_command("team-c")
    assert re.findall(r"^rms_\S+$", other.stdout, re.MULTILINE) != [key]  # a fresh key each time
    assert yaml.safe_load(other.stdout.split("`keys:` list:", 1)[1])[0]["models"] == ["*"]


def test_rmserve_api_key_refuses_a_bad_name() -> None:
    made = api_key_command("team c", "--max-concurrent-items", "0")
    assert made.returncode == 2 and "rms_" not in made.stdout
    assert "name: String should match pattern" in made.stderr
    assert "max_concurrent_items: Input should be greater than or equal to 1" in made.stderr


# -- settings ------------------------------------------------------------------------------------


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = keys_file(tmp_path / "keys.yaml", "keys:\n" + entry("admin", ADMIN))
    monkeypatch.setenv("RMSERVE_API_KEYS_FILE", str(path))
    monkeypatch.setenv("RMSERVE_MAX_ITEMS_PER_REQUEST", "7")
    settings = Settings()
    assert settings.api_keys_file == path
    assert settings.max_items_per_request == 7
    assert Settings(max_items_per_request=3).max_items_per_request == 3  # flags override env


def test_plaintext_keys_in_the_environment_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RMSERVE_API_KEYS", "k" * 24)  # the old setting: never silently open
    with pytest.raises(ValidationError, match="RMSERVE_API_KEYS is no longer read"):
        Settings()


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"default_timeout_s": 100, "max_timeout_s": 10}, "exceeds max_timeout_s"),
        ({"port": 70000}, "less than or equal to 65535"),
        ({"quota_lease_ttl_s": 0}, "greater than 0"),
    ],
)
def test_inconsistent_settings_are_refused(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(**kwargs)  # type: ignore[arg-type]


def test_cli_reports_bad_settings_without_a_traceback(tmp_path: Path) -> None:
    path = keys_file(tmp_path / "keys.yaml", "keys:\n  - {name: team-b, sha256: 12}\n")
    for env, says in [
        ({"RMSERVE_MAX_ITEMS_PER_REQUEST": "0"}, "max_items_per_request"),
        ({"RMSERVE_API_KEYS_FILE": str(path)}, "keys[0] ('team-b').sha256"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "rmserve.service.cli", "serve", "--port", "1"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 2
        assert "invalid settings" in done.stderr and says in done.stderr
        assert "Traceback" not in done.stderr
