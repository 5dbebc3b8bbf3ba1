"""The command line: `python -m loadtests run ...` or `python -m loadtests suite ...`.

    python -m loadtests run --url http://127.0.0.1:8000 --scenario steady --model tiny-rm \
        [--out DIR]
    python -m loadtests suite --out loadtests/reports/NAME [--registry loadtests/registry.yaml]

`run` drives the named scenarios (default: all) against a running server on loopback and prints
the report (also written to --out with its plots, if given); `suite` starts `rmserve serve`
itself, runs them all and writes report.md, the PNG plots and requests.jsonl into --out. Every
LoadConfig field is a flag (--rate, --duration-s, --sweep-rates 1,2,3, --mix tiny-rm:3,math:1,
...). Exit codes: 0 the load test ran (failed requests are in the report), 1 the server did not
start, 2 bad arguments or a URL that is not loopback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.loopback import require_loopback
from loadtests.report import Report, render_markdown, write_report
from loadtests.scenarios import SCENARIOS, LoadConfig
from loadtests.suite import REGISTRY, run_against, run_suite
from loadtests.workload import EXAMPLES, Workload
from rmserve.service.launcher import ServerFailed


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`name[:weight],...` (weight 1 when left out)."""
    mix = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition(":")
        mix.append((name, float(weight) if weight else 1.0))
    if not mix or any(weight <= 0 for _, weight in mix):
        raise argparse.ArgumentTypeError("give model[:weight],... with weights > 0")
    return tuple(mix)


def _tuple_of(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(part) for part in text.split(",") if part.strip())

    return parse


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per LoadConfig field, typed after its default."""
    group = parser.add_argument_group("load (see loadtests/scenarios.py LoadConfig)")
    defaults = LoadConfig()
    for f in dataclasses.fields(LoadConfig):
        default: Any = getattr(defaults, f.name)
        parse: Callable[[str], Any]
        if f.name == "mix":
            parse, shown = parse_mix, ",".join(f"{name}:{w:g}" for name, w in default)
        elif isinstance(default, tuple):
            parse = _tuple_of(int if f.name == "large_batch_sizes" else float)
            shown = ",".join(f"{v:g}" for v in default) or "none"
        else:
            parse, shown = type(default), str(default)
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, dest=f.name, type=parse, default=default, help=f"({shown})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="drive scenarios against a running loopback server")
    run.add_argument("--url", default="http://127.0.0.1:8000", help="loopback base URL")
    suite = commands.add_parser("suite", help="start rmserve serve, run every scenario, report")
    suite.add_argument("--registry", type=Path, default=REGISTRY, help="registry YAML")
    suite.add_argument("--ready-timeout-s", type=float, default=900.0, help="model loading")
    for sub in (run, suite):
        sub.add_argument(
            "--scenario",
            action="append",
            choices=SCENARIOS,
            help="a scenario to run (repeatable; default: all, in the order listed)",
        )
        sub.add_argument("--items", type=Path, default=EXAMPLES, help="JSON lines of examples")
        _config_flags(sub)
    run.add_argument("--out", type=Path, help="also write the report and plots here")
    suite.add_argument("--out", type=Path, required=True, help="report directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    try:
        config = LoadConfig(
            **{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadConfig)}
        )
        workload = Workload.from_file(args.items, config.max_extra_steps)
        if args.command == "run":
            require_loopback(args.url)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report: Report
    if args.command == "run":
        report = run_against(args.url, config, names, workload)
    else:
        try:
            report = run_suite(
                args.registry, config, names, workload, ready_timeout_s=args.ready_timeout_s
            )
        except ServerFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.out is not None:
        for path in write_report(report, args.out):
            print(f"wrote {path}", file=sys.stderr)
    if args.command == "run":
        print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
