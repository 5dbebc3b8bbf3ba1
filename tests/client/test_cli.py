"""`rmserve score` end to end against a scripted loopback server."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rmserve.client.cli import score_main
from tests.client import ScriptedServer, error_reply


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer() as scripted:
        yield scripted


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text(
        "".join(f"{line}\n" if isinstance(line, str) else json.dumps(line) + "\n" for line in lines)
    )
    return path


def trajectory(content: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scores_in_input_order_with_summary(
    server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [trajectory("x" * n, id=f"t{n}") for n in range(10)]
    items[4].pop("id")
    source = write_jsonl(tmp_path / "in.jsonl", [*items[:5], "", *items[5:]])
    out = tmp_path / "out.jsonl"
    argv = [str(source), "--model", "rm", "-o", str(out), "--url", server.url]
    code = score_main([*argv, "--batch-size", "3", "--concurrency", "2", "--options", '{"a": 1}'])
    assert code == 0
    results = read_jsonl(out)
    assert [r["index"] for r in results] == list(range(10))
    assert [r["score"] for r in results] == [float(n) for n in range(10)]
    assert results[4]["id"] == "line-5" and results[5]["id"] == "t5"  # line 6 was blank
    assert server.requests == 4
    assert all(body["options"] == {"a": 1, "stream": True} for body in server.bodies)
    err = capsys.readouterr().err
    assert "10 items in" in err and "items/s" in err
    assert "errors: 0" in err
    assert "score: mean 4.5000, min 0.0000, max 9.0000 (10 scored)" in err


def test_item_errors_exit_1_and_are_counted(
    server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = [
        trajectory("ab", id="a"),
        trajectory("c", id="b", metadata={"error": "timeout"}),
        trajectory("d", id="c", metadata={"error": "too_long"}),
        trajectory("e", id="d", metadata={"error": "timeout"}),
    ]
    source, out = write_jsonl(tmp_path / "in.jsonl", items), tmp_path / "out.jsonl"
    assert score_main([str(source), "--model", "rm", "-o", str(out), "--url", server.url]) == 1
    results = read_jsonl(out)
    assert [r["id"] for r in results] == ["a", "b", "c", "d"]
    assert results[1]["error"]["type"] == "timeout" and results[0]["error"] is None
    err = capsys.readouterr().err
    assert "errors: 3 (timeout: 2, too_long: 1)" in err
    assert "score: mean 2.0000, min 2.0000, max 2.0000 (1 scored)" in err


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "in.jsonl:2: not valid JSON"),
        ("[1, 2]", "in.jsonl:2: expected a trajectory object, got list"),
        ('{"messages": []}', 'in.jsonl:2: a trajectory needs a non-empty "messages" list'),
    ],
)
def test_bad_line_exits_2_before_sending(
    line: str,
    message: str,
    server: ScriptedServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [trajectory("a"), line, trajectory("b")])
    out = tmp_path / "out.jsonl"
    assert score_main([str(source), "--model", "rm", "-o", str(out), "--url", server.url]) == 2
    assert message in capsys.readouterr().err
    assert server.requests == 0
    assert not out.exists()


def test_rejected_item_names_its_input_line(
    server: ScriptedServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.script(
        error_reply(
            422, "invalid_request", "items.1.messages.0.role: bad", param="items.1.messages.0.role"
        )
    )
    source = write_jsonl(tmp_path / "in.jsonl", [trajectory("a"), "", trajectory("b")])
    argv = [str(source), "--model", "rm", "-o", str(tmp_path / "o.jsonl"), "--url", server.url]
    assert score_main(argv) == 2
    assert "input line 3 rejected (422 invalid_request)" in capsys.readouterr().err


def test_unreachable_service_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    source = write_jsonl(tmp_path / "in.jsonl", [trajectory("a")])
    argv = [str(source), "--model", "rm", "-o", str(tmp_path / "o.jsonl"), "--url", url]
    assert score_main([*argv, "--max-retries", "0"]) == 2
    assert f"cannot reach the service at {url}" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [trajectory("a")])
    base = [str(source), "--model", "rm", "-o", str(tmp_path / "o.jsonl")]
    assert score_main([str(source)]) == 2  # no --model
    assert score_main([*base, "--batch-size", "0"]) == 2
    assert score_main([*base, "--options", "[1]"]) == 2
    assert score_main([*base, "--api-key-env", "RMSERVE_TEST_UNSET_VAR"]) == 2
    assert score_main([str(tmp_path / "missing.jsonl"), "--model", "rm", "-o", "x"]) == 2
    err = capsys.readouterr().err
    assert "--options must be a JSON object" in err
    assert "RMSERVE_TEST_UNSET_VAR is not set" in err
    assert "cannot read" in err


def test_api_key_env(
    server: ScriptedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_KEY", "k1")
    source = write_jsonl(tmp_path / "in.jsonl", [trajectory("a")])
    argv = [str(source), "--model", "rm", "-o", str(tmp_path / "o.jsonl"), "--url", server.url]
    assert score_main([*argv, "--api-key-env", "MY_KEY"]) == 0
    assert server.auth == ["Bearer k1"]
