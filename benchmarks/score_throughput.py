"""Throughput of rmserve against vLLM called directly, on the same trajectories and model.

    python benchmarks/score_throughput.py [--items 300] [--concurrency 32] [--batch-size 8]
        [--hidden-size 512] [--layers 4] [--seed 0] [--enforce-eager]
        [--max-num-batched-tokens N]

A tiny random Llama reward model is generated into a temp directory, and the same mixed-length
chat trajectories (system prompt, question, answer, some with tool calls; 50-1500 tokens after
chat-template rendering) are scored twice, one after the other:

  (a) baseline: `vllm.LLM(runner="pooling")` in a child process (its engine memory is freed
      when it exits), every trajectory rendered with the chat template and all of them scored
      by ONE `llm.classify` call; render + classify are timed, after an untimed warm-up.
  (b) service: `rmserve serve` as a subprocess with a registry naming the same model and engine
      options, loaded by many concurrent clients (loadtests/score_load.py) after a warm-up.

It prints items/s of both, the ratio (b)/(a) against the target, and the largest difference
between the scores of (a) and (b) for the same items, which shows both scored the same inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `models`, `service`, `loadtests` importable
    sys.path.insert(0, str(REPO))

from loadtests.score_load import LoadResult, run_load  # noqa: E402
from rmserve.models.rendering import template_messages  # noqa: E402
from rmserve.models.spec import EngineOptions  # noqa: E402
from rmserve.service.launcher import ServerFailed, ServerProcess  # noqa: E402
from rmserve.wire.trajectory import Trajectory  # noqa: E402

MODEL = "tiny-rm"
TARGET_RATIO = 0.9
SCORE_TOLERANCE = 1e-3
MIN_TOKENS, MAX_TOKENS = 50, 1500
WARMUP_ITEMS = 8
READY_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------

_SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer briefly.",
    "You are a careful math tutor. Reason step by step and put the final answer in \\boxed{}.",
    "You are a coding agent. You can run Python with the code_run tool and search the web "
    "with the search tool. Check your work before you answer.",
    "You are a research assistant with a search tool. Cite what you find and say when you "
    "are not sure.",
]
_TOPICS = [
    "the Eiffel Tower",
    "binary search",
    "photosynthesis",
    "the French Revolution",
    "compound interest",
    "hash tables",
    "the water cycle",
    "prime numbers",
    "TCP congestion control",
    "the Pythagorean theorem",
]
_QUESTIONS = [
    "What is {a} times {b}?",
    "Explain {topic} to a new student.",
    "A shop sells {a} pencils for ${b}. How much do {c} pencils cost?",
    "Write a Python function about {topic} and test it.",
    "Summarize what is known about {topic}, with sources.",
    "Is {a} a prime number? Show your reasoning.",
]
_SENTENCES = [
    "Step {k}: multiply {a} by {b} to get {ab}.",
    "Then add {c} to the result, which gives {abc}.",
    "Let x be the number of apples. Then {a}x + {c} = {abc}, so x is {b}.",
    "We check the edge case where the list is empty, and the function returns None.",
    "The key idea of {topic} is to split the problem into smaller parts.",
    "I ran the tests: {a} passed and {k} failed, so there is still an off-by-one error.",
    "The capital of France is Paris, which is known for the Eiffel Tower and the Louvre.",
    "In short, {topic} matters because it makes the answer easier to check.",
    "def add(a, b):\n    return a + b\n\nprint(add({a}, {b}))  # {ab_sum}",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "This uses {c} steps in the worst case, which is fast enough for the input sizes here.",
    "So the answer is \\boxed{{{ab}}}.",
]
_TOOLS = {
    "search": ("query", "{topic} facts", "Result {k}: {topic} was studied in {year}."),
    "code_run": ("code", "print({a} * {b})", "{ab}"),
    "calculator": ("expression", "{a} * {b} + {c}", "{abc}"),
}


def _fill(template: str, rng: random.Random) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 500)
    return template.format(
        a=a,
        b=b,
        c=c,
        ab=a * b,
        abc=a * b + c,
        ab_sum=a + b,
        k=rng.randint(1, 9),
        year=rng.randint(1700, 2024),
        topic=rng.choice(_TOPICS),
    )


def _answer(sentences: list[str], count: int) -> str:
    paragraphs = [" ".join(sentences[i : min(i + 4, count)]) for i in range(0, count, 4)]
    return "\n\n".join(paragraphs)


def _trajectory(
    index: int, rng: random.Random, target: int, count_tokens: Any
) -> tuple[dict[str, Any], int]:
    """One trajectory whose rendering has about `target` tokens (the first length >= target
    reachable by adding answer sentences; shorter ones keep the skeleton only)."""
    short = target < 120
    system = rng.choice(_SYSTEM_PROMPTS[:2] if short else _SYSTEM_PROMPTS)
    question = _fill(rng.choice(_QUESTIONS[:1] if short else _QUESTIONS), rng)
    tool_rounds = 0 if target < 300 else rng.choice([0, 0, 1, 1, 2])
    head: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
    ]
    for round_ in range(tool_rounds):
        name = rng.choice(sorted(_TOOLS))
        arg, value, response = _TOOLS[name]
        call_id = f"call_{index}_{round_}"
        head.append(
            {
                "role": "assistant",
                "content": "I will use a tool for this." if rng.random() < 0.7 else None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": name,
                            "arguments": json.dumps({arg: _fill(value, rng)}),
                        },
                    }
                ],
            }
        )
        head.append({"role": "tool", "tool_call_id": call_id, "content": _fill(response, rng)})
    sentences = [_fill(rng.choice(_SENTENCES), rng) for _ in range(target // 4 + 4)]

    def build(count: int) -> dict[str, Any]:
        answer = _answer(sentences, count) or "The answer is 4."
        return {
            "id": f"traj-{index}",
            "messages": [*head, {"role": "assistant", "content": answer}],
        }

    low, high = 0, len(sentences)  # smallest sentence count whose length reaches the target
    while low < high:
        middle = (low + high) // 2
        if count_tokens(build(middle)) >= target:
            high = middle
        else:
            low = middle + 1
    # That count or one fewer, whichever is nearer the target within MIN_TOKENS..MAX_TOKENS.
    candidates = []
    for count in (low - 1, low) if low > 0 else (low,):
        length = count_tokens(build(count))
        outside = length < MIN_TOKENS or length > MAX_TOKENS
        candidates.append((outside, abs(length - target), length, count))
    _, _, length, count = min(candidates)
    return build(count), length


def render(tokenizer: Any, item: dict[str, Any]) -> str:
    """The text the service renders for an item (ChatRenderer.render)."""
    messages = template_messages(Trajectory.model_validate(item).messages)
    text: str = tokenizer.apply_chat_template(messages, tokenize=False)
    return text


def make_trajectories(
    tokenizer: Any, count: int, seed: int, prefix: str = "traj"
) -> tuple[list[dict[str, Any]], list[int]]:
    """`count` trajectories with lengths spread evenly over MIN_TOKENS..MAX_TOKENS, in a
    shuffled order; deterministic for a seed. Returns the items and their token lengths."""
    rng = random.Random(seed)

    def count_tokens(item: dict[str, Any]) -> int:
        return len(tokenizer(render(tokenizer, item), add_special_tokens=False)["input_ids"])

    span = MAX_TOKENS - MIN_TOKENS
    targets = [MIN_TOKENS + round(span * i / max(1, count - 1)) for i in range(count)]
    rng.shuffle(targets)
    items, lengths = [], []
    for index, target in enumerate(targets):
        item, length = _trajectory(index, rng, target, count_tokens)
        item["id"] = f"{prefix}-{index}"
        items.append(item)
        lengths.append(length)
    return items, lengths


# --------------------------------------------------------------------------------------------
# (a) Baseline: vLLM in-process, in a child process
# --------------------------------------------------------------------------------------------

# The engine_args() fields the service sets; the baseline passes the same values to vllm.LLM.
_ENGINE_FIELDS = (
    "tokenizer",
    "runner",
    "max_model_len",
    "dtype",
    "kv_cache_memory_bytes",
    "gpu_memory_utilization",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enforce_eager",
    "tensor_parallel_size",
    "trust_remote_code",
    "seed",
    "disable_log_stats",
)


def _llm_kwargs(model_dir: Path, options: EngineOptions) -> dict[str, Any]:
    """vllm.LLM keyword arguments equal to what the service gives AsyncLLM (engine_args())."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from rmserve.models.engine import engine_args

    served = engine_args(model_dir, model_dir, options)
    default = AsyncEngineArgs(model=str(model_dir))
    changed = {
        name
        for name in vars(default)
        if name != "model" and getattr(served, name) != getattr(default, name)
    }
    unknown = changed - set(_ENGINE_FIELDS)
    if unknown:
        raise RuntimeError(f"engine_args() sets fields this benchmark does not pass: {unknown}")
    return {name: getattr(served, name) for name in _ENGINE_FIELDS}


def _scheduler_limits(config: Any) -> dict[str, Any]:
    return {
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "chunked_prefill": config.scheduler_config.enable_chunked_prefill,
        "prefix_caching": config.cache_config.enable_prefix_caching,
    }


def _service_scheduler_limits(model_dir: Path, options: EngineOptions) -> dict[str, Any]:
    """The scheduler limits the service's engine gets. The same engine options give different
    vLLM defaults by usage context: LLM (LLM_CLASS) vs AsyncLLM.from_engine_args (ENGINE)."""
    from vllm.usage.usage_lib import UsageContext

    from rmserve.models.engine import engine_args

    served = engine_args(model_dir, model_dir, options)
    return _scheduler_limits(served.create_engine_config(UsageContext.ENGINE_CONTEXT))


def baseline_child(spec_path: Path, out_path: Path) -> None:
    """Runs in the child process: score the items with vllm.LLM, write the results as JSON."""
    from transformers import AutoTokenizer
    from vllm import LLM, PoolingParams

    spec = json.loads(spec_path.read_text())
    model_dir = Path(spec["model_dir"])
    options = EngineOptions.model_validate(spec["engine"])
    items = [Trajectory.model_validate(item) for item in spec["items"]]
    warmup = [Trajectory.model_validate(item) for item in spec["warmup"]]

    started = time.perf_counter()
    llm = LLM(model=str(model_dir), **_llm_kwargs(model_dir, options))
    engine_start_s = time.perf_counter() - started
    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    params = PoolingParams(use_activation=False)

    def texts_of(trajectories: list[Trajectory]) -> list[str]:
        return [
            tokenizer.apply_chat_template(template_messages(t.messages), tokenize=False)
            for t in trajectories
        ]

    llm.classify(texts_of(warmup), pooling_params=params, use_tqdm=False)

    this = psutil.Process()
    groups = {"baseline main (LLM)": [this], "engine core + worker": this.children(recursive=True)}
    before = _cpu_seconds(groups)
    started = time.perf_counter()
    texts = texts_of(items)
    rendered = time.perf_counter()
    outputs = llm.classify(texts, pooling_params=params, use_tqdm=False)
    finished = time.perf_counter()
    after = _cpu_seconds(groups)
    limits = {
        "baseline": _scheduler_limits(llm.llm_engine.vllm_config),
        "service": _service_scheduler_limits(model_dir, options),
    }

    out_path.write_text(
        json.dumps(
            {
                "seconds": finished - started,
                "render_s": rendered - started,
                "classify_s": finished - rendered,
                "engine_start_s": engine_start_s,
                "scores": [float(output.outputs.probs[0]) for output in outputs],
                "prompt_tokens": [len(output.prompt_token_ids) for output in outputs],
                "cached_tokens": sum(output.num_cached_tokens or 0 for output in outputs),
                "limits": limits,
                "cpu_s": {label: after[label] - before[label] for label in groups},
            }
        )
    )
    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None:  # stop the engine-core process before this one exits
        engine_core.shutdown()


@dataclass(frozen=True)
class Baseline:
    seconds: float
    render_s: float
    classify_s: float
    engine_start_s: float
    scores: list[float]
    prompt_tokens: list[int]
    cached_tokens: int
    limits: dict[str, Any]
    # CPU seconds used during the timed part, by process group (psutil user + system time).
    cpu_s: dict[str, float]


def run_baseline(
    work: Path,
    model_dir: Path,
    options: EngineOptions,
    items: list[dict[str, Any]],
    warmup: list[dict[str, Any]],
) -> Baseline:
    spec_path, out_path = work / "baseline-spec.json", work / "baseline-out.json"
    spec = {
        "model_dir": str(model_dir),
        "engine": options.model_dump(),
        "items": items,
        "warmup": warmup,
    }
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, __file__, "--baseline-child", str(spec_path), str(out_path)]
    completed = subprocess.run(command, cwd=REPO, check=False)
    if completed.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"the baseline child failed (exit code {completed.returncode})")
    return Baseline(**json.loads(out_path.read_text()))


# --------------------------------------------------------------------------------------------
# (b) Service: rmserve serve as a subprocess, loaded with run_load
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    load: LoadResult
    warmup: LoadResult
    ready_s: float
    # CPU seconds used during the load, by process group (psutil user + system time).
    cpu_s: dict[str, float]


def _cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for label, group in processes.items():
        total = 0.0
        for process in group:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        totals[label] = total
    return totals


def write_registry(work: Path, model_dir: Path, options: EngineOptions) -> Path:
    registry = work / "registry.yaml"
    entry = {"kind": "discriminative", "weights": str(model_dir), "engine": options.model_dump()}
    registry.write_text(yaml.safe_dump({"models": {MODEL: entry}}))
    return registry


def run_service(
    work: Path,
    model_dir: Path,
    options: EngineOptions,
    items: list[dict[str, Any]],
    warmup: list[dict[str, Any]],
    concurrency: int,
    batch_size: int,
) -> Service:
    """Start `rmserve serve` on a free loopback port, load it, stop it (SIGTERM) and wait."""
    started = time.perf_counter()
    registry = write_registry(work, model_dir, options)
    with ServerProcess(registry, work / "server.log") as server:
        models = {m["name"]: m for m in server.wait_settled(READY_TIMEOUT_S)}
        ready_s = time.perf_counter() - started
        if models[MODEL]["status"] != "ready":
            raise ServerFailed(
                f"model {MODEL} is unavailable: {models[MODEL]['reason']}\n{server.log_tail()}"
            )
        return asyncio.run(_drive(server, items, warmup, concurrency, batch_size, ready_s))


async def _drive(
    server: ServerProcess,
    items: list[dict[str, Any]],
    warmup: list[dict[str, Any]],
    concurrency: int,
    batch_size: int,
    ready_s: float,
) -> Service:
    warm = await run_load(
        server.base_url, MODEL, warmup, concurrency=4, batch_size=2, timeout_s=REQUEST_TIMEOUT_S
    )
    if warm.errors:
        raise ServerFailed(f"warm-up failed: {warm.error_samples}")
    gateway = psutil.Process(server.process.pid)
    groups = {
        "client (this process)": [psutil.Process()],
        "server main (gateway + AsyncLLM)": [gateway],
        "server children (engine core + worker)": gateway.children(recursive=True),
    }
    before = _cpu_seconds(groups)
    load = await run_load(
        server.base_url,
        MODEL,
        items,
        concurrency=concurrency,
        batch_size=batch_size,
        timeout_s=REQUEST_TIMEOUT_S,
    )
    after = _cpu_seconds(groups)
    cpu_s = {label: after[label] - before[label] for label in groups}
    return Service(load=load, warmup=warm, ready_s=ready_s, cpu_s=cpu_s)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def wait_listed_ready(gateway: ServerProcess, others: Sequence[ServerProcess], model: str) -> None:
    """Wait until a distributed gateway's GET /v1/models lists `model` as ready (it reads the
    workers' states from Redis every second); fail as soon as one of the servers exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: Any = None
    with httpx.Client(base_url=gateway.base_url, timeout=5) as client:
        while time.monotonic() < deadline:
            for server in (gateway, *others):
                if server.process.poll() is not None:
                    raise ServerFailed(
                        f"{server.log_path.name}: exited with code {server.process.returncode}"
                        f"\n{server.log_tail()}"
                    )
            try:
                models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
            except httpx.TransportError:
                time.sleep(0.25)
                continue
            last = models.get(model)
            if last is not None and last["status"] == "ready":
                return
            time.sleep(0.25)
    raise ServerFailed(f"the gateway does not list {model} as ready: {last}")


def machine() -> tuple[int, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return len(os.sched_getaffinity(0)), model


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = weights.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def report(
    args: argparse.Namespace,
    model_dir: Path,
    options: EngineOptions,
    lengths: list[int],
    baseline: Baseline,
    service: Service,
) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    cores, cpu = machine()
    load = service.load
    ratio = load.items_per_s / (len(lengths) / baseline.seconds)
    baseline_rate = len(lengths) / baseline.seconds
    pairs = [(a, b) for a, b in zip(baseline.scores, load.scores, strict=True) if b is not None]
    max_diff = max((abs(a - b) for a, b in pairs), default=float("nan"))
    same_tokens = baseline.prompt_tokens == lengths
    met = ratio >= TARGET_RATIO
    scores_ok = len(pairs) == len(lengths) and max_diff <= SCORE_TOLERANCE

    def row(label: str, value: str) -> None:
        print(f"  {label:<22} {value}")

    print()
    print("=" * 78)
    print("rmserve score throughput vs. vLLM called directly")
    print("=" * 78)
    print("model")
    row("name", f"{MODEL} (random Llama, sequence classification, 1 label)")
    row(
        "size",
        f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"{config['num_attention_heads']} heads, intermediate {config['intermediate_size']}, "
        f"vocab {config['vocab_size']}, {parameter_count(model_dir) / 1e6:.2f} M parameters",
    )
    row(
        "engine",
        f"dtype {options.dtype}, max_model_len {options.max_model_len}, "
        f"kv_cache_gib {options.kv_cache_gib}, enforce_eager {options.enforce_eager}, "
        f"max_num_batched_tokens {options.max_num_batched_tokens or 'default'}",
    )
    for label, limits in baseline.limits.items():
        row(f"scheduler ({label})", ", ".join(f"{k} {v}" for k, v in limits.items()))
    budgets = {limits["max_num_batched_tokens"] for limits in baseline.limits.values()}
    if len(budgets) > 1:
        row(
            "note",
            "same engine options, but vLLM picks a different default token budget per step "
            "for LLM and AsyncLLM; --max-num-batched-tokens N sets both",
        )
    print("machine")
    row("cores (nproc)", str(cores))
    row("cpu", cpu)
    print("workload")
    row(
        "items",
        f"{len(lengths)} trajectories, seed {args.seed}; tokens min {min(lengths)}, "
        f"mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)} (total {sum(lengths)})",
    )
    row("same token counts", f"{same_tokens} (baseline engine prompt lengths vs. tokenizer)")
    print("(a) baseline: vllm.LLM.classify, one call over all items")
    row("engine start", f"{baseline.engine_start_s:.1f} s")
    row(
        "time",
        f"{baseline.seconds:.2f} s (render {baseline.render_s:.2f} s + classify "
        f"{baseline.classify_s:.2f} s); prefix-cache hits {baseline.cached_tokens} tokens",
    )
    row("throughput", f"{baseline_rate:.1f} items/s, {sum(lengths) / baseline.seconds:.0f} tok/s")
    row(
        "cpu during classify",
        ", ".join(f"{label} {seconds:.1f} s" for label, seconds in baseline.cpu_s.items()),
    )
    print(
        f"(b) service: rmserve serve, {args.concurrency} concurrent clients, "
        f"{args.batch_size} items/request"
    )
    row("ready after", f"{service.ready_s:.1f} s")
    row(
        "time",
        f"{load.seconds:.2f} s for {load.items} items, {load.errors} errors, "
        f"{load.failed_requests}/{load.requests} requests failed",
    )
    row("throughput", f"{load.items_per_s:.1f} items/s, {sum(lengths) / load.seconds:.0f} tok/s")
    row(
        "request latency",
        f"p50 {load.latency_p50_s:.2f} s, p95 {load.latency_p95_s:.2f} s, "
        f"p99 {load.latency_p99_s:.2f} s",
    )
    row(
        "cpu during load",
        ", ".join(f"{label} {seconds:.1f} s" for label, seconds in service.cpu_s.items()),
    )
    for sample in load.error_samples:
        row("error", sample)
    print("result")
    row("ratio (b)/(a)", f"{ratio:.3f}   target >= {TARGET_RATIO}: {'MET' if met else 'NOT MET'}")
    row(
        "scores (b) vs (a)",
        f"max abs diff {max_diff:.2e} over {len(pairs)} items (tolerance {SCORE_TOLERANCE}): "
        f"{'OK' if scores_ok else 'MISMATCH'}",
    )
    print("=" * 78)
    return met and scores_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=300, help="trajectories to score")
    parser.add_argument("--concurrency", type=int, default=32, help="service: requests in flight")
    parser.add_argument("--batch-size", type=int, default=8, help="service: items per request")
    parser.add_argument("--hidden-size", type=int, default=512, help="multiple of 64")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="model weights and trajectories")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="skip graph compilation (default: compiled)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="engine token budget per step for both (default: vLLM's, which differs for the "
        "two: 4096 for LLM, 2048 for AsyncLLM on CPU)",
    )
    parser.add_argument("--baseline-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    if args.baseline_child:
        baseline_child(*args.baseline_child)
        return 0
    if args.items < 1 or args.hidden_size % 64 or args.hidden_size < 64 or args.layers < 1:
        parser.error("--items and --layers must be >= 1, --hidden-size a multiple of 64")

    from transformers import AutoTokenizer

    from rmserve.models.tiny import make_tiny_models

    with tempfile.TemporaryDirectory(prefix="rmserve-bench-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_models(
            work / "models",
            hidden_size=args.hidden_size,
            layers=args.layers,
            max_positions=2048,
            seed=args.seed,
        )[MODEL]
        options = EngineOptions(
            dtype="float32",
            max_model_len=2048,
            kv_cache_gib=0.5,
            enforce_eager=args.enforce_eager,
            max_num_batched_tokens=args.max_num_batched_tokens,
            seed=args.seed,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        started = time.perf_counter()
        items, lengths = make_trajectories(tokenizer, args.items, args.seed)
        warmup, _ = make_trajectories(tokenizer, WARMUP_ITEMS, args.seed + 1, prefix="warmup")
        print(
            f"built {len(items)} trajectories in {time.perf_counter() - started:.1f} s; "
            f"running (a) baseline ...",
            flush=True,
        )
        baseline = run_baseline(work, model_dir, options, items, warmup)
        print(f"(a) done in {baseline.seconds:.2f} s; running (b) service ...", flush=True)
        try:
            service = run_service(
                work, model_dir, options, items, warmup, args.concurrency, args.batch_size
            )
        except ServerFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        ok = report(args, model_dir, options, lengths, baseline, service)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
