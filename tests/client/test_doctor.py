"""`rmserve-client doctor URL` against real servers on loopback: a real `rmserve serve` with the
`math` verifier (tests/client/conftest.py), and a gateway with API keys and no OpenRLHF model."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from rmserve.client.cli import main
from rmserve.client.doctor import redacted
from rmserve.service.auth import hash_key, new_key
from rmserve.service.config import Settings
from rmserve.service.directory import ModelDirectory
from rmserve.service.gateway import create_app
from rmserve.service.launcher import ServerProcess, free_port
from rmserve.service.metrics import Metrics
from rmserve.service.queue import InProcessQueue

KEY = new_key()


def doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["doctor", *argv])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def unconfigured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway with one API key and no RMSERVE_OPENRLHF_MODEL, on a loopback port (uvicorn
    in a thread): the /get_reward URL with the key in its user info, as OpenRLHF is given it."""
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: openrlhf, sha256: {hash_key(KEY)}}}\n")
    app = create_app(
        Settings(api_keys_file=keys), InProcessQueue(10), ModelDirectory([]), Metrics()
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://openrlhf:{KEY}@127.0.0.1:{port}/get_reward"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_good_sample_prints_its_reward(
    verifiers: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, f"{verifiers.base_url}/get_reward")  # the default sample: 2 + 2
    assert code == 0, out
    assert f"POST {verifiers.base_url}/get_reward\n" in out
    assert '"query": ["What is 2 + 2? Put the final answer in \\\\boxed{}. 2 + 2 = 4' in out
    assert "200 OK: reward 1.0, score 1.0; extra_logs: rmserve_error 0.0" in out
    assert out.endswith("OpenRLHF would get the reward 1.0 for this sample.\n")


def test_a_wrong_answer_is_a_reward_too(
    verifiers: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{verifiers.base_url}/get_reward?model=exact"
    code, out = doctor(capsys, url, "--prompt", "Capital of France?", "--response", "Lyon",
                       "--label", "Paris")  # fmt: skip
    assert code == 0 and "OpenRLHF would get the reward 0.0 for this sample." in out, out


def test_a_sample_without_label_prints_the_cause_and_what_to_do(
    verifiers: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, f"{verifiers.base_url}/get_reward", "--label", "")
    assert code == 1, out
    assert "422 Unprocessable Entity: invalid_request (param query): 1 queries not scored: " in out
    assert "query[0]: missing_reference" in out
    assert "what to do: the sample has no label" in out and "label_key" in out
    assert "OpenRLHF logs only the status line" in out


def test_a_label_rmserve_cannot_read(
    verifiers: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, f"{verifiers.base_url}/get_reward", "--label", "true")
    assert code == 1, out
    assert "(param labels[0]): labels[0]: a boolean label is ambiguous" in out
    assert "what to do: the dataset's label is not one rmserve reads" in out


def test_on_error_report_on_the_url_is_refused(
    verifiers: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, f"{verifiers.base_url}/get_reward?on_error=report")
    assert code == 1, out
    assert "(param on_error): on_error=report answers null rewards, which OpenRLHF cannot" in out
    assert "what to do: drop on_error from the URL" in out


def test_an_on_error_number_is_not_a_score(
    verifiers: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = doctor(capsys, f"{verifiers.base_url}/get_reward?on_error=-1", "--label", "")
    assert code == 1, out
    assert "200 OK: reward -1.0, score -1.0; extra_logs: rmserve_error 1.0" in out
    assert "not scored: missing_reference: " in out
    assert "OpenRLHF would get the on_error reward -1.0 for it" in out


def test_no_model_configured(unconfigured: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = doctor(capsys, unconfigured)
    assert code == 1, out
    assert KEY not in out and "POST http://openrlhf:***@127.0.0.1:" in out  # Basic, redacted
    assert "422 Unprocessable Entity: invalid_request (param model): no model: set " in out
    assert "what to do: set RMSERVE_OPENRLHF_MODEL=NAME on the server, or add ?model=NAME" in out


def test_a_wrong_key(unconfigured: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = doctor(capsys, unconfigured.replace(KEY, KEY[:-4] + "abcd"))
    assert code == 1, out
    assert "401 Unauthorized: unauthorized: invalid API key" in out
    assert "what to do: put the API key in the URL's user info" in out


def test_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = doctor(capsys, f"http://127.0.0.1:{free_port()}/get_reward", "--timeout-s", "5")
    assert code == 1, out
    assert "cannot reach http://127.0.0.1:" in out and "ConnectError" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["doctor"]) == 2
    assert main(["doctor", "rmserve:8000/get_reward"]) == 2
    assert "must start with http:// or https://" in capsys.readouterr().err


def test_the_key_is_redacted() -> None:
    assert redacted("http://a:k3y@h:1/get_reward?model=m") == "http://a:***@h:1/get_reward?model=m"
    assert redacted("http://h:1/get_reward") == "http://h:1/get_reward"
