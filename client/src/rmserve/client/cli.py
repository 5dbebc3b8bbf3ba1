"""`rmserve score`: score a JSONL file of trajectories, one result line per input line.

Exit codes: 0 all items scored, 1 some items errored (every result is still written),
2 usage or input errors, or the service failed (unreachable, unknown model, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm  # type: ignore[import-untyped]

from rmserve.client.client import (
    API_KEY_ENV,
    DEFAULT_URL,
    RewardClient,
    RewardServiceError,
    ScoreResult,
)

PROG = "rmserve score"
_ITEM_PARAM = re.compile(r"^items\.(\d+)")


class InputError(Exception):
    """The command line or the input file is wrong (exit 2, nothing sent)."""


@dataclass(frozen=True)
class Line:
    number: int
    item: dict[str, Any]


@dataclass
class Summary:
    count: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    scores: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def add(self, result: ScoreResult) -> None:
        self.count += 1
        if result.error is not None:
            self.errors[result.error.type] += 1
        elif result.score is not None:
            self.scores.append(result.score)

    def text(self) -> str:
        rate = self.count / self.wall_s if self.wall_s > 0 else 0.0
        errors = sum(self.errors.values())
        kinds = ", ".join(f"{kind}: {n}" for kind, n in self.errors.most_common())
        lines = [
            f"{PROG}: {self.count} items in {self.wall_s:.2f} s ({rate:.1f} items/s)",
            f"  errors: {errors} ({kinds})" if errors else "  errors: 0",
        ]
        if self.scores:
            mean = sum(self.scores) / len(self.scores)
            lines.append(
                f"  score: mean {mean:.4f}, min {min(self.scores):.4f}, "
                f"max {max(self.scores):.4f} ({len(self.scores)} scored)"
            )
        else:
            lines.append("  score: no scores")
        return "\n".join(lines)


class OrderedWriter:
    """Writes results in input order as they finish in any order; fills a missing `id`
    from the input item, else `line-N`."""

    def __init__(self, out: IO[str], lines: Sequence[Line]) -> None:
        self.out, self.lines = out, lines
        self.pending: dict[int, ScoreResult] = {}
        self.written = 0

    def add(self, result: ScoreResult) -> None:
        self.pending[result.index] = result
        while self.written in self.pending:
            self._write(self.pending.pop(self.written))
            self.written += 1

    def _write(self, result: ScoreResult) -> None:
        data = result.model_dump(mode="json")
        line = self.lines[result.index]
        data["id"] = data.get("id") or line.item.get("id") or f"line-{line.number}"
        self.out.write(json.dumps(data, ensure_ascii=False) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="score a JSONL file of trajectories")
    p.add_argument("input", type=Path, help="JSONL: one trajectory object per line")
    p.add_argument("--model", required=True, help="the model's name (GET /v1/models)")
    p.add_argument("-o", "--output", required=True, type=Path, help="JSONL results, input order")
    p.add_argument("--url", default=os.environ.get("RMSERVE_URL", DEFAULT_URL))
    p.add_argument("--api-key-env", help=f"env var holding the API key (default {API_KEY_ENV})")
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--concurrency", type=_positive(int), default=8, help="batches in flight")
    p.add_argument("--timeout-s", type=_positive(float), default=600, help="HTTP timeout")
    p.add_argument("--max-retries", type=_natural, default=5)
    p.add_argument("--options", help="request options as JSON, e.g. '{\"timeout_s\": 30}'")
    return p


def score_main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors and --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        lines = read_lines(args.input)
        options = parse_options(args.options)
        api_key = _api_key(args.api_key_env)
    except InputError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    client = RewardClient(
        args.url,
        api_key=api_key,
        timeout_s=args.timeout_s,
        max_retries=args.max_retries,
        max_concurrency=args.concurrency,
        batch_size=args.batch_size,
    )
    with client:
        return _score(client, args, lines, options)


def _score(
    client: RewardClient, args: argparse.Namespace, lines: list[Line], options: dict[str, Any]
) -> int:
    try:
        out = args.output.open("w", encoding="utf-8")
    except OSError as exc:
        print(f"{PROG}: cannot write {args.output}: {exc}", file=sys.stderr)
        return 2
    summary, writer = Summary(), OrderedWriter(out, lines)
    started = time.perf_counter()
    try:
        with out:
            results = client.stream(args.model, [line.item for line in lines], options=options)
            for result in _progress(results, len(lines)):
                writer.add(result)
                summary.add(result)
    except RewardServiceError as exc:
        print(f"{PROG}: {describe(exc, lines, args.url)}", file=sys.stderr)
        print(f"{PROG}: wrote {writer.written} of {len(lines)} results", file=sys.stderr)
        return 2
    summary.wall_s = time.perf_counter() - started
    print(summary.text(), file=sys.stderr)
    return 1 if summary.errors else 0


def _progress(results: Iterator[ScoreResult], total: int) -> Iterator[ScoreResult]:
    with tqdm(total=total, unit="item", desc="scoring", file=sys.stderr) as bar:
        for result in results:
            yield result
            bar.update(1)


def read_lines(path: Path) -> list[Line]:
    """The non-blank lines of a JSONL file, each a trajectory object, or InputError naming
    the first bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    lines = [
        Line(number, _trajectory(raw, f"{path}:{number}"))
        for number, raw in enumerate(text.splitlines(), start=1)
        if raw.strip()
    ]
    if not lines:
        raise InputError(f"{path} has no items")
    return lines


def _trajectory(raw: str, where: str) -> dict[str, Any]:
    try:
        item = json.loads(raw)
    except ValueError as exc:
        raise InputError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a trajectory object, got {type(item).__name__}")
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(f'{where}: a trajectory needs a non-empty "messages" list')
    return item


def parse_options(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        options = json.loads(text)
    except ValueError as exc:
        raise InputError(f"--options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise InputError("--options must be a JSON object")
    return options


def describe(exc: RewardServiceError, lines: Sequence[Line], url: str) -> str:
    """The failure in the user's terms: the input line of a rejected item, or the URL."""
    if exc.status is None:
        return f"cannot reach the service at {url}: {exc.message}"
    match = _ITEM_PARAM.match(exc.param or "")
    if match and int(match.group(1)) < len(lines):
        line = lines[int(match.group(1))]
        return f"input line {line.number} rejected ({exc.status} {exc.type}): {exc.message}"
    return f"the service answered {exc.status} {exc.type}: {exc.message}"


def _api_key(env: str | None) -> str | None:
    if env is None:
        return os.environ.get(API_KEY_ENV) or None
    key = os.environ.get(env)
    if not key:
        raise InputError(f"--api-key-env: environment variable {env} is not set")
    return key


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error
    return parse


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(score_main())


def main(argv: list[str] | None = None) -> int:
    """`rmserve-client score ...` (the server's `rmserve score` is the same command) and
    `rmserve-client doctor URL` (rmserve.client.doctor): the client distribution's commands."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["score"]:
        return score_main(args[1:])
    if args[:1] == ["doctor"]:
        from rmserve.client.doctor import doctor_main

        return doctor_main(args[1:])
    print(
        "usage: rmserve-client score INPUT --model NAME -o OUTPUT [options]\n"
        "       rmserve-client doctor URL [--prompt P --response R --label L]\n"
        "(rmserve-client score --help, rmserve-client doctor --help list the options)",
        file=sys.stderr,
    )
    return 0 if args[:1] in (["-h"], ["--help"]) else 2
