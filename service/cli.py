"""The `rmserve` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rmserve import examples
from rmserve.models.spec import RegistryError, load_registry
from rmserve.service.config import Settings

WORKER_PORT = 8001
SANDBOX_PORT = 8002


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:  # the client CLI: its own flags (rmserve score --help)
        from rmserve.client.cli import score_main

        return score_main(argv[1:])
    args = build_parser().parse_args(argv)
    return _run(args)


def build_parser() -> argparse.ArgumentParser:
    """The `rmserve` command line (also checked against the Dockerfile and compose files)."""
    parser = argparse.ArgumentParser(prog="rmserve", description="reward-model inference service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "score",
        add_help=False,
        help="score a JSONL file of trajectories with a running service (see: score --help)",
    )

    serve = commands.add_parser("serve", help="run gateway, queue and workers in one process tree")
    _server_flags(serve)
    serve.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")

    gateway = commands.add_parser(
        "gateway", help="distributed mode: a stateless HTTP gateway in front of Redis"
    )
    _server_flags(gateway)
    _distributed_flags(gateway)

    worker = commands.add_parser(
        "worker", help="distributed mode: a worker hosting one model of the registry"
    )
    worker.add_argument("--model", required=True, help="the registry name of the model")
    _server_flags(worker, port_help=f"health and metrics port (default {WORKER_PORT})")
    _distributed_flags(worker)

    sandbox = commands.add_parser(
        "sandbox", help="the tool sandbox sidecar (crop, search, code_run, calculator, checks)"
    )
    sandbox.add_argument("--host")
    sandbox.add_argument("--port", type=int, help=f"HTTP port (default {SANDBOX_PORT})")
    sandbox.add_argument(
        "--allow-unsafe-code",
        action="store_true",
        default=None,
        help="development only: run code without bubblewrap when it does not work",
    )
    sandbox.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    sandbox.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")

    dead = commands.add_parser(
        "dead-letters", help="distributed mode: list a model's dead-lettered jobs and why"
    )
    dead.add_argument("model")
    dead.add_argument("--redis-url", help="default: RMSERVE_REDIS_URL")

    usage = commands.add_parser(
        "usage",
        help="distributed mode: each tenant's usage over the last hours, as JSON (items, "
        "errors, tokens, seconds queued and computing, by model)",
    )
    usage.add_argument("--hours", type=float, default=24.0, help="the window (default 24)")
    usage.add_argument("--tenant", action="append", help="only these tenants (repeatable)")
    usage.add_argument("--redis-url", help="default: RMSERVE_REDIS_URL")

    demo = commands.add_parser(
        "demo", help="start the embedded service, score the example trajectories, print rewards"
    )
    _server_flags(demo)
    demo.add_argument(
        "--examples",
        type=Path,
        default=examples.TRAJECTORIES,
        help="JSON lines, one trajectory per line (default: the examples shipped with rmserve)",
    )
    demo.add_argument("--load-timeout-s", type=float, default=1800.0)

    check = commands.add_parser(
        "check-registry",
        help="validate a registry file and list its models (and a keys file: its tenants and "
        "keys, against the registry's models)",
    )
    check.add_argument("registry", type=examples.registry_path)
    check.add_argument(
        "--keys", type=Path, default=None, help="a keys file (RMSERVE_API_KEYS_FILE) to validate"
    )

    key = commands.add_parser(
        "api-key",
        help="make an API key: print the key once and its entry for the keys file "
        "(RMSERVE_API_KEYS_FILE)",
    )
    key.add_argument("name", help="the key's name, shown in logs and errors (never the key)")
    key.add_argument("--models", help="comma-separated models it may use (default: every model)")
    key.add_argument("--requests-per-s", type=float, help="rate limit (token bucket)")
    key.add_argument("--burst", type=int, help="requests at once (default: the rate)")
    key.add_argument("--max-concurrent-items", type=int, help="items in flight at once")

    tiny = commands.add_parser(
        "make-tiny-models", help="write tiny random reward models (for trying rmserve offline)"
    )
    tiny.add_argument("out", type=Path)
    tiny.add_argument(
        "--twins",
        action="store_true",
        help="also the tiny twins of real reward-model families (configs and chat templates)",
    )

    inspect = commands.add_parser(
        "inspect-model",
        help="check a model before serving it: its kind, head, vLLM's view, its chat template, "
        "and vLLM's score against transformers",
    )
    inspect.add_argument(
        "model", help="a model directory, or a hub id (where the hub is reachable)"
    )
    inspect.add_argument(
        "--kind",
        choices=["discriminative", "process", "generative"],
        help="serve it as this kind (default: from the architecture in config.json)",
    )
    inspect.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        help="score a sample on the vLLM CPU engine and with transformers, and compare "
        "(default: on for discriminative and process models)",
    )
    inspect.add_argument(
        "--trust-remote-code", action="store_true", help="run the model's own code (auto_map)"
    )
    inspect.add_argument("--step-tag", help="a process model's step tag (default: a known one)")
    inspect.add_argument("--json", action="store_true", help="print the report as one JSON object")

    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "check-registry":
        return _check_registry(args.registry, args.keys)
    if args.command == "make-tiny-models":
        from rmserve.models.tiny import make_tiny_models, make_twins

        paths = make_tiny_models(args.out)
        if args.twins:
            paths |= make_twins(args.out)
        for name, path in paths.items():
            print(f"{name}\t{path}")
        return 0
    if args.command == "inspect-model":
        from rmserve.service import inspect_model

        return inspect_model.main(
            args.model, kind=args.kind, compare=args.compare, as_json=args.json,
            trust_remote_code=args.trust_remote_code, step_tag=args.step_tag,
        )  # fmt: skip
    if args.command == "sandbox":
        return _run_sandbox(args)
    if args.command == "api-key":
        return _api_key(args)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in exc.errors()
        )
        print(
            f"error: invalid settings (RMSERVE_* environment or flags): {problems}", file=sys.stderr
        )
        return 2
    if args.command in ("serve", "gateway", "worker"):
        return _run_server(args, settings)
    if args.command == "dead-letters":
        return _dead_letters(settings, args.model)
    if args.command == "usage":
        return _usage(settings, args.hours, args.tenant)
    from rmserve.service.demo import run_demo

    return run_demo(settings, args.port, args.examples, args.load_timeout_s)


def _server_flags(parser: argparse.ArgumentParser, port_help: str = "HTTP port") -> None:
    parser.add_argument(
        "--registry",
        type=examples.registry_path,
        help="model registry YAML, or a shipped one: default, tiny (default: RMSERVE_REGISTRY, "
        "else the shipped default)",
    )
    parser.add_argument("--host")
    parser.add_argument("--port", type=int, help=port_help)


def _distributed_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", help="e.g. redis://:password@redis:6379/0 (default: RMSERVE_REDIS_URL)"
    )
    parser.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ...")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in ("registry", "host", "port", "log_json", "log_level", "redis_url")
    }
    if args.command == "worker" and args.port is None and "RMSERVE_PORT" not in os.environ:
        overrides["port"] = WORKER_PORT  # beside a gateway on its default port
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def _run_sandbox(args: argparse.Namespace) -> int:
    import uvicorn

    from rmserve.sandbox.app import create_sandbox_app
    from rmserve.sandbox.config import SandboxSettings
    from rmserve.service.logs import configure_logging
    from rmserve.wire.errors import ToolError

    flags = {"host": args.host, "port": args.port, "allow_unsafe_code": args.allow_unsafe_code,
             "log_json": args.log_json, "log_level": args.log_level}  # fmt: skip
    try:
        settings = SandboxSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: invalid sandbox settings (RMSERVE_SANDBOX_*): {problems}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        app = create_sandbox_app(settings)
    except ToolError as exc:  # code_run without a working bubblewrap
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    return 0


def _api_key(args: argparse.Namespace) -> int:
    """A fresh key, printed once, and its keys-file entry (its SHA-256, never the key)."""
    import yaml

    from rmserve.service.auth import KeyEntry, hash_key, new_key

    key = new_key()
    fields: dict[str, Any] = {"name": args.name, "sha256": hash_key(key)}
    if args.models is not None:
        fields["models"] = [model.strip() for model in args.models.split(",") if model.strip()]
    for name in ("requests_per_s", "burst", "max_concurrent_items"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    try:
        entry = KeyEntry.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2
    dumped = entry.model_dump(exclude_none=True)
    ordered = {name: dumped[name] for name in ("name", "sha256", "models") if name in dumped}
    text = yaml.safe_dump([ordered | dumped], sort_keys=False)
    print(f"API key {entry.name!r} (shown only now and stored nowhere: hand it to its user):")
    print(f"\n{key}\n")
    print("Its entry for the keys file (RMSERVE_API_KEYS_FILE), to add to its `keys:` list:")
    print(f"\n{text}", end="")
    return 0


def _check_registry(path: Path, keys_path: Path | None = None) -> int:
    from rmserve.service.auth import KeysFileError, load_keys

    try:
        registry = load_registry(path)
        keys = load_keys(keys_path) if keys_path is not None else {}
    except (RegistryError, KeysFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, spec in registry.models.items():
        print(f"{name}\t{spec.kind}\t{spec.weights}")
    for key in keys.values():  # as at start-up: a warning (one keys file may serve several)
        if missing := sorted((key.models or set()) - set(registry.models)):
            print(
                f"warning: key {key.name!r} names models not in {path}: {missing}", file=sys.stderr
            )
        for tenant in key.tenants:
            print(f"key {key.name}\ttenant {tenant.name}\tweight {tenant.weight:g}\t"
                  f"{tenant.priority} ({', '.join(tenant.priorities)})")  # fmt: skip
    return 0


def _usage(settings: Settings, hours: float, tenants: list[str] | None) -> int:
    """Every tenant's usage (or `tenants'`) in the last `hours`, read from Redis."""
    import asyncio
    import time

    from rmserve.service.queue import QueueUnavailableError
    from rmserve.service.redis_connect import redis_client
    from rmserve.service.usage import RedisUsage, UsageReport

    if not settings.redis_url and not settings.redis_sentinels:
        print("error: rmserve usage needs --redis-url or RMSERVE_REDIS_URL (or "
              "RMSERVE_REDIS_SENTINELS); an embedded server answers GET /v1/usage",
              file=sys.stderr)  # fmt: skip
        return 2

    async def read() -> UsageReport:
        ledger = RedisUsage(redis_client(settings), settings.usage_retention_days)
        now = time.time()
        return await ledger.report(now - hours * 3600, now, tenants)

    try:
        report = asyncio.run(read())
    except QueueUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.model_dump_json(indent=2))
    return 0


def _dead_letters(settings: Settings, model: str) -> int:
    """One JSON line per dead-lettered job: its id, item index and id, and the reason."""
    import asyncio
    import json

    from rmserve.service.queue import QueueUnavailableError
    from rmserve.service.queue.redis_streams import StreamQueue, StreamSettings
    from rmserve.service.redis_connect import redis_client

    if not settings.redis_url and not settings.redis_sentinels:
        print("error: rmserve dead-letters needs --redis-url or RMSERVE_REDIS_URL (or "
              "RMSERVE_REDIS_SENTINELS)", file=sys.stderr)  # fmt: skip
        return 2

    async def read() -> list[dict[str, str]]:
        queue = StreamQueue(redis_client(settings), StreamSettings())
        try:
            return await queue.dead_letters(model)
        finally:
            await queue.close()

    try:
        letters = asyncio.run(read())
    except QueueUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for letter in letters:
        job = json.loads(letter["job"])
        line = {"job": job["id"], "index": job["index"], "item_id": job["item"].get("id")}
        print(json.dumps({**line, "reason": letter["reason"]}))
    return 0


def _run_server(args: argparse.Namespace, settings: Settings) -> int:
    """`serve` (embedded), `gateway` or `worker`: build the app, run it until SIGTERM."""
    import uvicorn

    from rmserve.service.distributed import GatewayRuntime, WorkerRuntime
    from rmserve.service.embedded import EmbeddedRuntime
    from rmserve.service.logs import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    try:
        registry = load_registry(settings.registry)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command != "serve" and not settings.redis_url and not settings.redis_sentinels:
        print(f"error: rmserve {args.command} needs --redis-url or RMSERVE_REDIS_URL (or "
              "RMSERVE_REDIS_SENTINELS)", file=sys.stderr)  # fmt: skip
        return 2
    if args.command == "serve":
        app = EmbeddedRuntime(settings, registry).app()
    elif args.command == "gateway":
        app = GatewayRuntime(settings, registry).app()
    elif args.model not in registry.models:
        known = ", ".join(sorted(registry.models)) or "none"
        print(f"error: model {args.model!r} is not in {settings.registry} (models: {known})",
              file=sys.stderr)  # fmt: skip
        return 2
    else:
        app = WorkerRuntime(settings, registry.models[args.model], registry.peers(args.model)).app()
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
