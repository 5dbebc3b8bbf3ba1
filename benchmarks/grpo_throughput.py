"""GRPO-shaped traffic (G groups x n responses to one long prompt each), scored side by side.

    python benchmarks/grpo_throughput.py [--groups 4] [--n 8 16] [--prompt-tokens 1000]
        [--response-tokens 100 400] [--systems a,b,c,d,prm] [--hidden-size 256] [--layers 4]
        [--seed 0] [--compile] [--block-size B] [--traffic group|sample] [--quick] [--json PATH]
    python benchmarks/grpo_throughput.py --shapes group,verl,openrlhf [--models rm,listwise]
        [--systems c,d] [--judge-max-tokens T] [--group-wait-s S] [--timeout-s S] [sizes]

A random Llama reward model (rmserve.models.tiny, sizes from the flags) is generated into a temp
directory. Each group is one prompt of about --prompt-tokens tokens (a system turn and a long
user turn starting with the group's own words, so groups share no cached block) and n assistant
responses of --response-tokens MIN..MAX tokens; an item is the chat, prompt + one response. The
same groups (the same token ids: rendered and tokenized by rmserve's ChatRenderer) are scored
by each system, one system at a time, each warmed up on other groups before the timed rounds
(one round per n: all G groups at once) and shut down before the next starts:

  (a)  vLLM called directly: AsyncLLM (pooling runner, rmserve's engine_args, prefix caching
       on) in a child process, every item's token ids submitted at once (`classify`); the
       ceiling. Prefix-cache queries and hits come from a vLLM stat logger.
  (b)  a plain transformers reward server (FastAPI + uvicorn, in a child process) that, per
       HTTP request, tokenizes the group's rendered texts, pads the batch and runs the forward
       pass in the request handler, as many RL frameworks' reward servers do; every token is
       computed, padding included.
  (c)  `rmserve serve --registry FILE`: POST /v1/score, one request per group (items in the
       OpenAI chat format, the group's id in `group`).
  (d)  distributed: redis-server + `rmserve gateway` + 2 x `rmserve worker`, with
       RMSERVE_ROUTING=prefix (prompt-affinity routing), round_robin (each job to the next
       worker) and shared (one queue, any free worker takes what it can).
  --traffic sample sends (c) and (d) one request per item, as OpenRLHF does, instead of one
  per group; --block-size sets every engine's KV cache block (the prefix cache reuses whole
  blocks).
  prm  the tiny process reward model in `rmserve serve`, options.reuse_prefix true vs false,
       at n = 8 (steps are the response's paragraphs).

For (c), (d) and prm, prefix-cache queries and hits are read from GET /metrics of the server or
of each worker (rmserve_engine_prefix_cache_{queries,hits}_total); where a server does not export
them the computed tokens are "n/a". Targets are printed as met / not met; the exit code is 0 when
every system ran without failed items, 1 otherwise. On a shared machine figures are indicative.

--shapes: the trainers' per-sample traffic against the same groups sent whole. (c) and (d, prefix
routing only) score each n in --repeats rounds per shape (benchmarks/traffic_shapes.py), the
shapes interleaved (their order rotated each repeat) and each row summing its rounds: `group` (one
request per group), `verl` (one request per item from 8 clients, each item to a client chosen at
random, each client one request at a time) and `openrlhf` (one request per item, all at once);
every item carries `id`, `group` and `group_size`. Each round gets its own groups: the same
responses under a relabelled prompt head, so no round finds another's prompts cached. The models
(--models): the tiny-rm above (discriminative: items scored one by one) and `tiny-listwise`, a
listwise judge on the random tiny-lm with structured outputs (every judgement parses) whose
max_tokens leaves room for a short critique and every score: a group sent in pieces is held by
the gateway until complete, then judged as one job. Per shape: items/s and computed prompt
tokens per item, and per-sample / group in the same run against targets (>= 0.9 items/s,
<= 1.1 computed tokens: never more than 10% worse). For the listwise judge, from the round's
/metrics deltas and results: per-sample groups completed == groups and none timed out
(rmserve_groups_total), judge jobs ok == groups (rmserve_jobs_total), every item scored and none
flagged partial_group. A listwise judgement must fit max_model_len (2048): keep n x responses
short (e.g. --groups 4 --n 8 --prompt-tokens 200 --response-tokens 30 80).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks`, `service`, ... importable
    sys.path.insert(0, str(REPO))

from benchmarks import traffic_shapes  # noqa: E402
from benchmarks.score_throughput import (  # noqa: E402
    _SENTENCES,
    _TOPICS,
    _fill,
    machine,
    parameter_count,
    wait_listed_ready,
)
from rmserve.models.rendering import ChatRenderer, template_messages  # noqa: E402
from rmserve.models.spec import EngineOptions  # noqa: E402
from rmserve.models.tiny import STEP_TAG  # noqa: E402
from rmserve.service.launcher import RedisServer, ServerFailed, ServerProcess, free_port  # noqa: E402
from rmserve.wire.trajectory import Trajectory  # noqa: E402

RM, PRM, LISTWISE = "tiny-rm", "tiny-prm", "tiny-listwise"
MODELS = {"rm": RM, "listwise": LISTWISE}  # --models: names -> registry names
MAX_MODEL_LEN = 2048
WORKERS = 2
PRM_N = 8
READY_TIMEOUT_S = 900.0
REQUEST_TIMEOUT_S = 1800.0
METRICS_SETTLE_S = 1.0  # stats reach the counters after the last output: wait before reading
TARGETS = {  # name: (threshold, higher is better)
    "(c)/(a) items/s": (0.95, True),
    "(d prefix)/(d shared) items/s": (1.0, True),
    "(d prefix)/(d round_robin) items/s": (1.0, True),
    "(d prefix)/(c) computed prompt tokens": (1.1, False),
    "prm reuse on/off items/s": (1.5, True),
}
# --shapes: per-sample traffic / whole groups, each per-sample shape (higher is better for
# items/s, lower for computed tokens: per-sample may be faster or compute less, never >10% worse)
SHAPE_TARGETS = {"items/s": (0.9, True), "computed prompt tokens": (1.1, False)}
JUDGE_CRITIQUE_CHARS = 16  # the listwise judge's critique, before its `Scores:` line
DIFFED = ("b", "c", "d-prefix", "d-shared", "d-round_robin")
ROUTINGS = ("prefix", "round_robin", "shared")  # systems scoring (a)'s items with (a)'s model
HITS, QUERIES = "rmserve_engine_prefix_cache_hits", "rmserve_engine_prefix_cache_queries"


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    id: str
    items: list[dict[str, Any]]  # chat-format trajectories: prompt turns + one response each
    texts: list[str]  # each item rendered with the chat template
    token_ids: list[list[int]]  # each text tokenized as rmserve does
    prompt_tokens: int  # tokens of the shared prompt (rendered, without the response)


def _words(rng: random.Random, target: int, count: Callable[[str], int], sep: str = " ") -> str:
    """Filler sentences (score_throughput's), appended until the text has `target` tokens."""
    text, parts = "", []
    while count(text) < target:
        parts.append(_fill(rng.choice(_SENTENCES), rng))
        text = sep.join(parts)
    return text


def make_groups(
    renderer: ChatRenderer,
    groups: int,
    n: int,
    prompt_tokens: int,
    response_tokens: tuple[int, int],
    seed: int,
    tag: str,
    steps: bool = False,
) -> list[Group]:
    """`groups` groups of `n` responses; deterministic for (seed, tag). `steps`: responses are
    paragraphs of 2-3 sentences separated by a blank line (a PRM's steps)."""
    rng = random.Random(f"{seed}-{tag}")

    def count(text: str) -> int:
        return len(renderer.encode(text))

    out = []
    for g in range(groups):
        gid = f"{tag}-g{g}"
        topic = rng.choice(_TOPICS)
        head = f"Problem {gid} ({rng.randrange(10**9)}) about {topic}. Context follows.\n"
        question = head + _words(rng, max(1, prompt_tokens - count(head) - 12), count)
        prompt = [
            {"role": "system", "content": "You are a careful assistant. Reason step by step."},
            {"role": "user", "content": question},
        ]
        answers = []
        for _ in range(n):
            target = rng.randint(*response_tokens)
            if steps:
                paragraphs: list[str] = []
                while count("\n\n".join(paragraphs)) < target:
                    paragraphs.append(_words(rng, rng.randint(20, 50), count))
                answers.append("\n\n".join(paragraphs))
            else:
                answers.append(_words(rng, target, count))
        out.append(_build(renderer, gid, prompt, answers))
    return out


def _build(
    renderer: ChatRenderer,
    gid: str,
    prompt: list[dict[str, Any]],
    answers: list[str],
    group_size: bool = False,
) -> Group:
    """A group of one prompt and these responses (each item with `group_size` when asked)."""
    items, texts, ids = [], [], []
    for i, answer in enumerate(answers):
        item: dict[str, Any] = {
            "id": f"{gid}-r{i}",
            "group": gid,
            **({"group_size": len(answers)} if group_size else {}),
            "messages": [*prompt, {"role": "assistant", "content": answer}],
        }
        text = renderer.render(template_messages(Trajectory.model_validate(item).messages))
        items.append(item)
        texts.append(text)
        ids.append(renderer.encode(text))
    shared = renderer.render(
        template_messages(Trajectory.model_validate({"messages": prompt}).messages)
    )
    return Group(gid, items, texts, ids, len(renderer.encode(shared)))


def relabel(renderer: ChatRenderer, groups: list[Group], label: str) -> list[Group]:
    """The same groups under new ids `{label}-{id}`, with `group_size` on every item: the same
    responses, the prompt's head naming the new id (so no two labels share a cached block, and
    labels of one length give prompts of the same token count)."""
    out = []
    for group in groups:
        gid = f"{label}-{group.id}"
        *prompt, _ = group.items[0]["messages"]
        head, renamed = f"Problem {group.id} (", f"Problem {gid} ("
        if not any(head in turn["content"] for turn in prompt):
            raise ValueError(f"group {group.id}: its prompt does not name it")
        prompt = [{**turn, "content": turn["content"].replace(head, renamed)} for turn in prompt]
        answers = [item["messages"][-1]["content"] for item in group.items]
        out.append(_build(renderer, gid, prompt, answers, group_size=True))
    return out


@dataclass(frozen=True)
class Workload:
    warmup: list[Group]
    rounds: dict[int, list[Group]]  # n -> the G groups timed together


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    system: str
    label: str
    n: int
    items: int
    seconds: float
    errors: int
    prompt_tokens: float  # per item: the tokens the engine ingests for it
    computed_tokens: float | None  # per item: prompt tokens not served from the prefix cache
    queries: float | None = None  # prefix-cache queries and hits during the round (tokens)
    hits: float | None = None
    scores: list[float | None] = field(default_factory=list)
    max_diff_vs_a: float | None = None
    note: str = ""
    # --shapes: the traffic shape and model of the row, the round's cohort and job counters
    # (traffic_shapes.counters) and, for the listwise judge, its complete-group checks.
    shape: str = ""
    model: str = ""
    groups: int = 0
    error_types: dict[str, int] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return (self.items - self.errors) / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# (a) vLLM called directly, in a child process
# --------------------------------------------------------------------------------------------


class _PrefixCounts:
    """rmserve.models.engine.EngineStats keeping the prefix-cache totals."""

    def __init__(self) -> None:
        self.queries = self.hits = 0

    def prefix_cache(self, queries: int, hits: int) -> None:
        self.queries += queries
        self.hits += hits

    def scheduler(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        pass

    def iteration(self, batch: int, prompt_tokens: int, generation_tokens: int) -> None:
        pass


async def _vllm_child(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from rmserve.models.engine import VllmPoolingEngine, engine_args, stat_logger_factory

    model_dir = Path(spec["model_dir"])
    options = EngineOptions.model_validate(spec["engine"])
    args = engine_args(model_dir, model_dir, options)
    served_default = args.create_engine_config(UsageContext.OPENAI_API_SERVER)
    args = engine_args(model_dir, model_dir, options)
    args.enable_prefix_caching = True
    counts = _PrefixCounts()
    llm = AsyncLLM.from_engine_args(
        args,
        usage_context=UsageContext.OPENAI_API_SERVER,  # the scheduler defaults rmserve gets
        stat_loggers=[stat_logger_factory(counts)],
    )
    engine = VllmPoolingEngine(llm, llm.model_config.max_model_len)
    try:

        async def score(ids: list[list[int]]) -> list[float]:
            outputs = await asyncio.gather(*(engine.pool(t, "classify") for t in ids))
            return [rows[0][0] for rows in outputs]

        await score([t for group in spec["warmup"] for t in group])
        rounds = []
        for groups in spec["rounds"]:
            await asyncio.sleep(METRICS_SETTLE_S)
            queries, hits = counts.queries, counts.hits
            started = time.perf_counter()
            scores = await score([t for group in groups for t in group])
            seconds = time.perf_counter() - started
            await asyncio.sleep(METRICS_SETTLE_S)
            rounds.append(
                {
                    "seconds": seconds,
                    "scores": scores,
                    "queries": counts.queries - queries,
                    "hits": counts.hits - hits,
                }
            )
        cache = llm.vllm_config.cache_config
        return {
            "rounds": rounds,
            "prefix_caching": cache.enable_prefix_caching,
            "served_prefix_caching": served_default.cache_config.enable_prefix_caching,
            "block_size": cache.block_size,
        }
    finally:
        engine.shutdown()


def run_vllm(work: Path, model_dir: Path, options: EngineOptions, load: Workload) -> list[Row]:
    spec_path, out_path = work / "vllm-spec.json", work / "vllm-out.json"
    spec = {
        "model_dir": str(model_dir),
        "engine": options.model_dump(),
        "warmup": [g.token_ids for g in load.warmup],
        "rounds": [[g.token_ids for g in groups] for groups in load.rounds.values()],
    }
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, __file__, "--vllm-child", str(spec_path), str(out_path)]
    completed = subprocess.run(command, cwd=REPO, check=False)
    if completed.returncode != 0 or not out_path.exists():
        raise ServerFailed(f"the vLLM child failed (exit code {completed.returncode})")
    out = json.loads(out_path.read_text())
    note = (
        f"prefix caching {out['prefix_caching']} (rmserve's default: "
        f"{out['served_prefix_caching']}), block {out['block_size']}"
    )
    rows = []
    for (n, groups), result in zip(load.rounds.items(), out["rounds"], strict=True):
        tokens = sum(len(t) for g in groups for t in g.token_ids)
        items = sum(len(g.items) for g in groups)
        rows.append(
            Row(
                "a",
                "vLLM AsyncLLM direct",
                n,
                items,
                result["seconds"],
                0,
                tokens / items,
                (tokens - result["hits"]) / items,
                result["queries"],
                result["hits"],
                result["scores"],
                note=note,
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# (b) A plain transformers reward server
# --------------------------------------------------------------------------------------------


def hf_app(model_dir: Path) -> Any:
    """The app: POST /score {"texts": [...]} -> {"scores": [...], "computed_tokens": N}."""
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    model: Any = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/score")
    async def score(body: dict[str, Any]) -> dict[str, Any]:
        # Tokenize, pad and run the forward pass in the handler, the event loop blocked.
        batch = tokenizer(
            body["texts"], add_special_tokens=False, padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            logits = model(**batch).logits
        return {
            "scores": logits[:, 0].tolist(),
            "prompt_tokens": batch["attention_mask"].sum(dim=1).tolist(),
            "computed_tokens": int(batch["input_ids"].numel()),
        }

    return app


def _hf_server_child(model_dir: Path, port: int) -> None:
    import uvicorn

    uvicorn.run(hf_app(model_dir), host="127.0.0.1", port=port, log_level="warning")


async def _post_groups(
    base_url: str, path: str, bodies: list[dict[str, Any]]
) -> tuple[float, list[dict[str, Any] | None], list[str]]:
    """POST every body at once; wall seconds, each response's JSON (None: failed), errors."""
    errors: list[str] = []
    limits = httpx.Limits(max_connections=len(bodies) + 1)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:

        async def one(body: dict[str, Any]) -> dict[str, Any] | None:
            try:
                response = await client.post(path, json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return None
            if response.status_code != 200:
                errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
                return None
            data: dict[str, Any] = response.json()
            return data

        started = time.perf_counter()
        results = await asyncio.gather(*(one(body) for body in bodies))
        return time.perf_counter() - started, list(results), errors


def run_hf(work: Path, model_dir: Path, load: Workload) -> list[Row]:
    port = free_port()
    command = [sys.executable, __file__, "--hf-server", str(model_dir), str(port)]
    with (work / "hf-server.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerFailed((work / "hf-server.log").read_text()[-3000:])
            try:
                if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)

        def bodies(groups: list[Group]) -> list[dict[str, Any]]:
            return [{"texts": g.texts} for g in groups]

        asyncio.run(_post_groups(base_url, "/score", bodies(load.warmup)))
        rows = []
        for n, groups in load.rounds.items():
            seconds, results, errors = asyncio.run(_post_groups(base_url, "/score", bodies(groups)))
            items = sum(len(g.items) for g in groups)
            tokens = sum(len(t) for g in groups for t in g.token_ids)
            scores: list[float | None] = []
            computed, seen, failed = 0, [], 0
            for g, result in zip(groups, results, strict=True):
                if result is None:
                    scores += [None] * len(g.items)
                    failed += len(g.items)
                    continue
                scores += result["scores"]
                computed += result["computed_tokens"]
                seen += result["prompt_tokens"]
            same = seen == [len(t) for g in groups for t in g.token_ids]
            rows.append(
                Row(
                    "b",
                    "transformers server",
                    n,
                    items,
                    seconds,
                    failed,
                    tokens / items,
                    computed / items,
                    scores=scores,
                    note=f"computed incl. padding; same token counts {same}"
                    + (f"; {errors[0]}" if errors else ""),
                )
            )
        return rows
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------------------------
# (c), (d), prm: rmserve over HTTP
# --------------------------------------------------------------------------------------------


def scrape(urls: Sequence[str]) -> tuple[float | None, float | None]:
    """Summed prefix-cache queries and hits of these servers' /metrics (None: not exported)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float | None] = {QUERIES: None, HITS: None}
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            if family.name in totals:
                for sample in family.samples:
                    if sample.name in (family.name, family.name + "_total"):
                        totals[family.name] = (totals[family.name] or 0.0) + sample.value
    return totals[QUERIES], totals[HITS]


def measure_rmserve(
    system: str,
    label: str,
    base_url: str,
    metrics_urls: Sequence[str],
    model: str,
    load: Workload,
    note: str,
    per_sample: bool = False,
) -> list[Row]:
    """Warm up, then one timed round per n: each group one POST /v1/score, or with
    `per_sample` each item its own request (as OpenRLHF sends them), all at once."""

    def bodies(groups: list[Group]) -> list[dict[str, Any]]:
        if per_sample:
            return [{"model": model, "items": [item]} for g in groups for item in g.items]
        return [{"model": model, "items": g.items} for g in groups]

    _, _, errors = asyncio.run(_post_groups(base_url, "/v1/score", bodies(load.warmup)))
    if errors:
        raise ServerFailed(f"{label}: warm-up failed: {errors[0]}")
    rows = []
    for n, groups in load.rounds.items():
        time.sleep(METRICS_SETTLE_S)
        queries0, hits0 = scrape(metrics_urls)
        sent = bodies(groups)
        seconds, results, errors = asyncio.run(_post_groups(base_url, "/v1/score", sent))
        time.sleep(METRICS_SETTLE_S)
        queries1, hits1 = scrape(metrics_urls)
        queries = None if queries0 is None or queries1 is None else queries1 - queries0
        hits = None if hits0 is None or hits1 is None else hits1 - hits0
        tally = _tally(sent, results, errors)
        items = sum(len(g.items) for g in groups)
        computed = _computed_tokens(tally.tokens, queries, hits)
        rows.append(
            Row(
                system,
                label,
                n,
                items,
                seconds,
                tally.failed,
                tally.tokens / items,
                None if computed is None else computed / items,
                queries,
                hits,
                tally.scores,
                note=note + (f"; {tally.errors[0][:200]}" if tally.errors else ""),
            )
        )
    return rows


@dataclass(frozen=True)
class _Tally:
    scores: list[float | None]  # each item's, in the order sent (None: no score)
    tokens: int  # the items' usage.prompt_tokens
    failed: int  # items without a score (their request failed, or the item has an error)
    partial: int  # items flagged partial_group (a listwise judge judged part of their group)
    errors: list[str]
    error_types: dict[str, int]  # failed items by error type (`request` when the request failed)


def _tally(
    sent: Sequence[dict[str, Any]], results: Sequence[dict[str, Any] | None], errors: list[str]
) -> _Tally:
    """What the responses to these request bodies say, item by item."""
    scores: list[float | None] = []
    tokens = failed = partial = 0
    errors = list(errors)
    types: dict[str, int] = {}
    for body, result in zip(sent, results, strict=True):
        if result is None:
            scores += [None] * len(body["items"])
            failed += len(body["items"])
            types["request"] = types.get("request", 0) + len(body["items"])
            continue
        for item in result["results"]:
            scores.append(item.get("score"))
            tokens += item["usage"]["prompt_tokens"]
            partial += item.get("partial_group") is not None
            if item.get("error") is not None or item.get("score") is None:
                failed += 1
                errors.append(str(item.get("error")))
                kind = (item.get("error") or {}).get("type", "no score")
                types[kind] = types.get(kind, 0) + 1
    return _Tally(scores, tokens, failed, partial, errors, types)


def _computed_tokens(tokens: int, queries: float | None, hits: float | None) -> float | None:
    """Prompt tokens the engine computed: the engine's prompt tokens minus cache hits. The
    engine may see more tokens than the items have (a PRM with reuse_prefix scores one request
    per step): then its queries."""
    if queries is None or hits is None:
        return None
    return max(tokens, queries) - hits


def write_registry(
    path: Path, model: str, model_dir: Path, engine: EngineOptions, **extra: Any
) -> Path:
    kind = {PRM: "process", LISTWISE: "generative"}.get(model, "discriminative")
    entry = {"kind": kind, "weights": str(model_dir), "engine": engine.model_dump(), **extra}
    path.write_text(yaml.safe_dump({"models": {model: entry}}))
    return path


@contextlib.contextmanager
def embedded(
    work: Path, name: str, registry: Path, model: str, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`rmserve serve` with `model` ready: its base URL (it serves /metrics too)."""
    server = ServerProcess(registry, work / f"serve-{name}.log", command="serve", env=env)
    try:
        models = {m["name"]: m for m in server.wait_settled(READY_TIMEOUT_S)}
        if models[model]["status"] != "ready":
            raise ServerFailed(f"{model}: {models[model]['reason']}\n{server.log_tail()}")
        yield server.base_url
    finally:
        server.stop()


def run_embedded(
    work: Path,
    system: str,
    label: str,
    registry: Path,
    model: str,
    load: Workload,
    note: str,
    per_sample: bool = False,
) -> list[Row]:
    with embedded(work, system, registry, model) as url:
        return measure_rmserve(system, label, url, [url], model, load, note, per_sample)


NOT_ACCEPTED = "NOT ACCEPTED by this checkout"


def accepted(model: str, name: str) -> bool:
    """Whether the checkout's `model` (e.g. rmserve.service.config.Settings) has field `name`,
    asked of a fresh interpreter: other work may add it while this benchmark runs, and the
    servers started from now on are fresh interpreters too."""
    module, _, cls = model.rpartition(".")
    code = f"import {module} as m; print({name!r} in m.{cls}.model_fields)"
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    return completed.stdout.strip() == "True"


@dataclass(frozen=True)
class Fleet:
    gateway: str  # base URLs
    workers: list[str]
    note: str


@contextlib.contextmanager
def fleet(
    work: Path,
    name: str,
    routing: str,
    registry: Path,
    model: str,
    env: dict[str, str] | None = None,
) -> Iterator[Fleet]:
    """redis-server + `rmserve gateway` + WORKERS x `rmserve worker --model MODEL`, with
    RMSERVE_ROUTING=routing (and `env`), all ready; stopped (workers, gateway, Redis) on exit."""
    folder = work / f"fleet-{name}"
    folder.mkdir()
    env = {**(env or {}), "RMSERVE_ROUTING": routing}
    note = f"RMSERVE_ROUTING={routing}"
    if not accepted("rmserve.service.config.Settings", "routing"):
        note += f" {NOT_ACCEPTED}: the shared queue ran"
    servers: list[ServerProcess] = []
    with RedisServer(folder) as redis_server:
        try:
            for index in range(WORKERS):  # stopped first: they drain, then leave the fleet
                servers.append(
                    ServerProcess(
                        registry,
                        folder / f"worker{index}.log",
                        command="worker",
                        args=["--redis-url", redis_server.url, "--model", model],
                        env=env,
                    )
                )
            gateway = ServerProcess(
                registry,
                folder / "gateway.log",
                command="gateway",
                args=["--redis-url", redis_server.url],
                env=env,
            )
            servers.append(gateway)
            for server in servers:
                server.wait_ready(READY_TIMEOUT_S)
            wait_listed_ready(gateway, servers[:-1], model)
            yield Fleet(gateway.base_url, [server.base_url for server in servers[:-1]], note)
        finally:
            for server in servers:
                server.stop()


def run_distributed(
    work: Path, routing: str, registry: Path, load: Workload, per_sample: bool = False
) -> list[Row]:
    with fleet(work, routing, routing, registry, RM) as f:
        return measure_rmserve(
            f"d-{routing}",
            f"rmserve distributed, 2 workers, {routing}",
            f.gateway,
            f.workers,
            RM,
            load,
            f.note,
            per_sample,
        )


# --------------------------------------------------------------------------------------------
# --shapes: the trainers' per-sample traffic against whole groups
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeLoad:
    warmup: list[Group]  # sent whole, before the timed rounds
    # n -> shape -> one list of G groups per repeat (each relabelled: never cached before)
    rounds: dict[int, dict[str, list[list[Group]]]]


@dataclass
class _ShapeRounds:
    """A shape's rounds at one n, summed: the bodies sent and their answers, in order."""

    bodies: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any] | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    per_round: list[float] = field(default_factory=list)  # items/s of each round
    groups: int = 0
    peak: int = 0
    clients: str = ""
    found: traffic_shapes.Snapshot = field(default_factory=dict)

    def add(
        self,
        groups: list[Group],
        bodies: list[dict[str, Any]],
        sent: traffic_shapes.Sent,
        found: traffic_shapes.Snapshot,
    ) -> None:
        self.bodies += bodies
        self.results += sent.results
        self.errors += sent.errors
        self.seconds += sent.seconds
        self.per_round.append(sum(len(g.items) for g in groups) / sent.seconds)
        self.groups += len(groups)
        self.peak = max(self.peak, sent.max_in_flight)
        for key, value in found.items():
            self.found[key] = self.found.get(key, 0.0) + value


def measure_shapes(
    system: str,
    label: str,
    base_url: str,
    metrics_urls: Sequence[str],
    model: str,
    load: ShapeLoad,
    note: str,
    seed: int,
) -> list[Row]:
    """Warm up, then for each n the timed rounds: every shape once per repeat, interleaved (the
    order rotated each repeat), each round on its own groups (the same responses, relabelled:
    no round finds another's prompts cached). A row per (n, shape) sums its rounds."""
    path = "/v1/score"
    warm = traffic_shapes.bodies(model, [g.items for g in load.warmup], "group")
    sent = asyncio.run(traffic_shapes.send(base_url, path, warm, None, REQUEST_TIMEOUT_S))
    if sent.errors:
        raise ServerFailed(f"{label}: warm-up failed: {sent.errors[0]}")
    rows = []
    for n, by_shape in load.rounds.items():
        shapes = list(by_shape)
        summed = {shape: _ShapeRounds() for shape in shapes}
        for repeat in range(len(by_shape[shapes[0]])):
            turn = repeat % len(shapes)
            for shape in shapes[turn:] + shapes[:turn]:
                groups = by_shape[shape][repeat]
                bodies = traffic_shapes.bodies(model, [g.items for g in groups], shape)
                rng = random.Random(f"{seed}-{shape}-{n}-{repeat}")
                order = traffic_shapes.lanes(shape, len(bodies), rng)
                time.sleep(METRICS_SETTLE_S)
                before = traffic_shapes.snapshot(metrics_urls)
                sent = asyncio.run(
                    traffic_shapes.send(base_url, path, bodies, order, REQUEST_TIMEOUT_S)
                )
                time.sleep(METRICS_SETTLE_S)
                found = traffic_shapes.delta(before, traffic_shapes.snapshot(metrics_urls))
                summed[shape].add(groups, bodies, sent, found)
                summed[shape].clients = (
                    f"{len(order)} clients, a client's requests at once" if order else "1 client"
                )
        rows += [_shape_row(system, label, model, n, shape, s, note) for shape, s in summed.items()]
    return rows


def _shape_row(
    system: str, label: str, model: str, n: int, shape: str, s: _ShapeRounds, note: str
) -> Row:
    tally = _tally(s.bodies, s.results, s.errors)
    queries = traffic_shapes.total(s.found, traffic_shapes.PREFIX_QUERIES, model=model)
    hits = traffic_shapes.total(s.found, traffic_shapes.PREFIX_HITS, model=model)
    computed = _computed_tokens(tally.tokens, queries, hits)
    counts = traffic_shapes.counters(s.found, model)
    items = sum(len(body["items"]) for body in s.bodies)
    scored = sum(score is not None for score in tally.scores)
    rounds = len(s.per_round)
    what = [
        f"{shape}: {rounds} round(s) of {len(s.bodies) // rounds} requests ({s.clients}), "
        f"max {s.peak} in flight; items/s by round {', '.join(f'{v:.1f}' for v in s.per_round)}",
        f"jobs ok {counts['jobs_ok']:g}"
        + (f", not ok {counts['jobs_not_ok']:g}" if counts["jobs_not_ok"] else ""),
    ]
    if counts["groups_opened"] or counts["groups_completed"] or counts["groups_timed_out"]:
        wait = (
            f"{counts['group_wait_sum'] / counts['group_wait_count']:.2f} s"
            if counts["group_wait_count"]
            else "n/a (none completed)"
        )
        what.append(
            f"groups opened/completed/timed out {counts['groups_opened']:g}/"
            f"{counts['groups_completed']:g}/{counts['groups_timed_out']:g}, mean wait {wait}"
        )
    return Row(
        system,
        label,
        n,
        items,
        s.seconds,
        tally.failed,
        tally.tokens / items,
        None if computed is None else computed / items,
        queries,
        hits,
        tally.scores,
        note="; ".join([note, *what])
        + (f"; failed items by error: {tally.error_types}" if tally.error_types else "")
        + (f"; first: {tally.errors[0][:200]}" if tally.errors else ""),
        shape=shape,
        model=model,
        groups=s.groups,
        error_types=tally.error_types,
        counters=counts,
        checks=traffic_shapes.listwise_checks(shape, s.groups, items, scored, tally.partial, counts)
        if model == LISTWISE
        else [],
    )


def run_shapes(
    work: Path,
    system: str,
    registry: Path,
    model: str,
    load: ShapeLoad,
    seed: int,
    env: dict[str, str],
) -> list[Row]:
    """(c) `rmserve serve` or (d) the distributed fleet with prefix routing, every shape."""
    if system == "c":
        with embedded(work, f"c-{model}", registry, model, env) as url:
            note = "embedded"
            return measure_shapes("c", "rmserve serve", url, [url], model, load, note, seed)
    with fleet(work, f"shapes-{model}", "prefix", registry, model, env) as f:
        return measure_shapes(
            "d-prefix",
            "rmserve distributed, 2 workers, prefix",
            f.gateway,
            [f.gateway, *f.workers],
            model,
            load,
            f.note,
            seed,
        )


def shape_ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """Per-sample / whole-group of each (system, model, n), against SHAPE_TARGETS."""
    by = {(row.system, row.model, row.n, row.shape): row for row in rows if row.shape}
    out = []
    for (system, model, n, shape), row in by.items():
        base = by.get((system, model, n, "group"))
        if shape == "group" or base is None:
            continue
        failed = [
            f"{r.shape}: {r.errors} of {r.items} items failed" for r in (row, base) if r.errors
        ]
        for what, (threshold, higher) in SHAPE_TARGETS.items():
            why = "; ".join(failed)
            if what == "items/s":  # the items scored per second: failed items count for none
                value = row.items_per_s / base.items_per_s if base.items_per_s else None
            elif failed:  # tokens of items never scored are no measure
                value = None
            else:
                value = (
                    None
                    if row.computed_tokens is None or not base.computed_tokens
                    else row.computed_tokens / base.computed_tokens
                )
                why = "" if value is not None else "prefix-cache metrics not exported"
            met = None if value is None else (value >= threshold if higher else value <= threshold)
            out.append(
                {
                    "ratio": f"{shape}/group {what}",
                    "system": system,
                    "model": model,
                    "n": n,
                    "value": value,
                    "target": threshold,
                    "higher_is_better": higher,
                    "met": met,
                    "note": why,
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    by = {(row.system, row.n): row for row in rows if not row.shape}
    out = []
    ns = sorted({row.n for row in rows if not row.shape})

    def add(name: str, n: int, value: float | None, why: str = "") -> None:
        threshold, higher = TARGETS[name]
        met = None if value is None else (value >= threshold if higher else value <= threshold)
        out.append(
            {
                "ratio": name,
                "n": n,
                "value": value,
                "target": threshold,
                "higher_is_better": higher,
                "met": met,
                "note": why,
            }
        )

    for n in ns:
        a, c = by.get(("a", n)), by.get(("c", n))
        dp, ds = by.get(("d-prefix", n)), by.get(("d-shared", n))
        dr = by.get(("d-round_robin", n))
        if dp and dr:
            add("(d prefix)/(d round_robin) items/s", n, dp.items_per_s / dr.items_per_s)
        if a and c:
            add("(c)/(a) items/s", n, c.items_per_s / a.items_per_s)
        if dp and ds:
            add(
                "(d prefix)/(d shared) items/s",
                n,
                dp.items_per_s / ds.items_per_s,
                "routing not accepted: both ran the shared queue"
                if NOT_ACCEPTED in dp.note
                else "",
            )
        if dp and c:
            value = (
                None
                if dp.computed_tokens is None or not c.computed_tokens
                else dp.computed_tokens / c.computed_tokens
            )
            add(
                "(d prefix)/(c) computed prompt tokens",
                n,
                value,
                "" if value is not None else "prefix-cache metrics not exported",
            )
        on, off = by.get(("prm-reuse", n)), by.get(("prm-noreuse", n))
        if on and off:
            add(
                "prm reuse on/off items/s",
                n,
                on.items_per_s / off.items_per_s,
                "reuse_prefix not accepted: both ran the same" if NOT_ACCEPTED in on.note else "",
            )
    return out


def report(rows: list[Row], found: list[dict[str, Any]], header: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for line in header:
        console.print(line)
    table = Table(title="GRPO-shaped scoring (per item: prompt tokens and tokens computed)")
    for column in (
        "system",
        "n",
        "items",
        "s",
        "items/s",
        "prompt tok/item",
        "computed tok/item",
        "max |Δscore| vs (a)",
        "note",
    ):
        table.add_column(column, justify="left" if column in ("system", "note") else "right")
    for row in rows:
        table.add_row(
            f"({row.system}) {row.label}" + (f" · {row.model} · {row.shape}" if row.shape else ""),
            str(row.n),
            f"{row.items - row.errors}/{row.items}",
            f"{row.seconds:.2f}",
            f"{row.items_per_s:.1f}",
            f"{row.prompt_tokens:.0f}",
            _fmt(row.computed_tokens, 0),
            _fmt(row.max_diff_vs_a, 6) if row.system in DIFFED and not row.shape else "-",
            row.note,
        )
    console.print(table)
    summary = Table(title="ratios against targets")
    for column in ("ratio", "n", "value", "target", "result", "note"):
        summary.add_column(column)
    for r in found:
        sign = ">=" if r["higher_is_better"] else "<="
        result = "n/a" if r["met"] is None else ("met" if r["met"] else "NOT met")
        name = f"({r['system']}, {r['model']}) {r['ratio']}" if "system" in r else r["ratio"]
        summary.add_row(
            name, str(r["n"]), _fmt(r["value"], 3), f"{sign} {r['target']}", result, r["note"]
        )
    console.print(summary)
    checked = [row for row in rows if row.checks]
    if checked:
        checks = Table(title="listwise judge: every judge job judged a complete group")
        for column in ("system", "n", "shape", "check", "value", "expected", "result"):
            checks.add_column(column)
        for row in checked:
            for c in row.checks:
                checks.add_row(
                    f"({row.system}) {row.model}",
                    str(row.n),
                    row.shape,
                    c["check"],
                    f"{c['value']:g}",
                    f"{c['expected']:g}",
                    "met" if c["met"] else "NOT met",
                )
        console.print(checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--groups", type=int, help="G: groups per round (4; --quick 2)")
    parser.add_argument("--n", type=int, nargs="+", help="responses per group (8 16; --quick 2 3)")
    parser.add_argument("--prompt-tokens", type=int, help="1000; --quick 120")
    parser.add_argument(
        "--response-tokens",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="100 400; --quick 20 40",
    )
    parser.add_argument(
        "--systems", help="comma-separated subset of a,b,c,d,prm (a,b,c,d,prm; --shapes: c,d)"
    )
    parser.add_argument("--hidden-size", type=int, help="multiple of 64 (256; --quick 64)")
    parser.add_argument("--layers", type=int, help="4; --quick 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile", action="store_true", help="vLLM graph compilation (slow start)"
    )
    parser.add_argument(
        "--block-size", type=int, help="KV cache block size of every engine (vLLM's default)"
    )
    parser.add_argument(
        "--traffic",
        choices=["group", "sample"],
        default="group",
        help="(c), (d): one request per group, or one per item (OpenRLHF's shape)",
    )
    parser.add_argument(
        "--shapes",
        help="comma-separated subset of group,verl,openrlhf: (c) and (d, prefix routing only) "
        "score the same groups in each trainer's request shape instead of --traffic",
    )
    parser.add_argument(
        "--models",
        help="with --shapes: comma-separated subset of rm (tiny-rm, discriminative) and "
        "listwise (a listwise judge on tiny-lm); default both",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help="with --shapes: timed rounds per shape and n, interleaved, summed in its row "
        "(3; --quick 1)",
    )
    parser.add_argument(
        "--judge-max-tokens",
        type=int,
        help="with --shapes: the listwise judge's max_tokens (default: room for its critique "
        "and every score, whatever the tokens)",
    )
    parser.add_argument(
        "--group-wait-s",
        type=float,
        help="with --shapes: the servers' RMSERVE_GROUP_WAIT_S, how long a group sent in pieces "
        "waits for its rest (default: the server's, 300 s); it bounds how long a round whose "
        "groups do not complete takes, it never makes them complete",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        help="with --shapes: the servers' RMSERVE_DEFAULT_TIMEOUT_S, how long a request waits "
        "for its items (default: the server's, 600 s); it bounds a round whose items hang",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (the flags given win): a smoke run"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--vllm-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--hf-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    if args.vllm_child:
        spec_path, out_path = args.vllm_child
        result = asyncio.run(_vllm_child(json.loads(spec_path.read_text())))
        out_path.write_text(json.dumps(result))
        return 0
    if args.hf_server:
        _hf_server_child(Path(args.hf_server[0]), int(args.hf_server[1]))
        return 0
    with_shapes = [args.models, args.repeats, args.judge_max_tokens, args.group_wait_s]
    with_shapes.append(args.timeout_s)
    sizes = {"groups": 4, "n": [8, 16], "prompt_tokens": 1000, "response_tokens": [100, 400]}
    sizes |= {"hidden_size": 256, "layers": 4, "repeats": 3}
    if args.quick:
        sizes = {"groups": 2, "n": [2, 3], "prompt_tokens": 120, "response_tokens": [20, 40]}
        sizes |= {"hidden_size": 64, "layers": 1, "repeats": 1}
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    def listed(value: str | None, default: str, known: Sequence[str], flag: str) -> list[str]:
        names = [s.strip() for s in (value or default).split(",") if s.strip()]
        if not names or set(names) - set(known):
            parser.error(f"{flag}: comma-separated names among {','.join(known)}")
        return names

    shapes = listed(args.shapes, "", traffic_shapes.SHAPES, "--shapes") if args.shapes else []
    everything = ["a", "b", "c", "d", "prm"]
    systems = listed(
        args.systems, "c,d" if shapes else ",".join(everything), everything, "--systems"
    )
    models = [MODELS[m] for m in listed(args.models, "rm,listwise", list(MODELS), "--models")]
    if not shapes and any(value is not None for value in with_shapes):
        parser.error(
            "--models, --repeats, --judge-max-tokens, --group-wait-s and --timeout-s go with "
            "--shapes"
        )
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if shapes and args.traffic != "group":
        parser.error("--shapes replaces --traffic: give one of them")
    low, high = args.response_tokens
    if args.groups < 1 or min(args.n) < 1 or not 1 <= low <= high:
        parser.error("bad --groups, --n or --response-tokens")
    if args.prompt_tokens + high + 100 > MAX_MODEL_LEN:
        parser.error(f"prompt + response tokens must fit max_model_len {MAX_MODEL_LEN}")
    if args.hidden_size % 64 or args.layers < 1:
        parser.error("--hidden-size must be a multiple of 64, --layers >= 1")
    # The listwise judge: room for a critique of JUDGE_CRITIQUE_CHARS characters (up to 4
    # tokens each), `Scores: ` and `X=10, ` per response, one token each at worst.
    judge_max_tokens = args.judge_max_tokens or 4 * JUDGE_CRITIQUE_CHARS + 16 + 6 * max(args.n)
    listwise = bool(shapes) and LISTWISE in models
    if listwise and not 2 <= min(args.n) <= max(args.n) <= 26:
        parser.error("the listwise judge compares 2 to 26 responses: --n")
    # Its prompt: its instructions (~150 tokens), the prompt, every response (~10 tokens of
    # labels each); then its judgement.
    judge_tokens = 150 + args.prompt_tokens + max(args.n) * (high + 10) + judge_max_tokens
    if listwise and judge_tokens > MAX_MODEL_LEN:
        parser.error(
            f"the listwise judge's prompt (~{judge_tokens} tokens with its judgement) must fit "
            f"max_model_len {MAX_MODEL_LEN}: fewer --n, --prompt-tokens or --response-tokens"
        )

    from transformers import AutoTokenizer

    from rmserve.models.tiny import make_tiny_models

    with tempfile.TemporaryDirectory(prefix="rmserve-grpo-") as tmp:
        work = Path(tmp)
        paths = make_tiny_models(
            work / "models",
            hidden_size=args.hidden_size,
            layers=args.layers,
            max_positions=MAX_MODEL_LEN,
            seed=args.seed,
        )
        options = EngineOptions(
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            kv_cache_gib=0.5,
            enforce_eager=not args.compile,
            seed=args.seed,
            block_size=args.block_size,
        )
        per_sample = args.traffic == "sample"
        renderer = ChatRenderer(AutoTokenizer.from_pretrained(paths[RM]), MAX_MODEL_LEN, "error")
        size = (args.prompt_tokens, tuple(args.response_tokens))
        load = Workload(
            warmup=make_groups(renderer, WORKERS * 2, 4, *size, args.seed, "warm"),
            rounds={
                n: make_groups(renderer, args.groups, n, *size, args.seed, f"n{n}") for n in args.n
            },
        )
        prm_n = min(PRM_N, max(args.n)) if args.quick else PRM_N
        prm_load = Workload(
            warmup=make_groups(renderer, 2, 4, *size, args.seed, "pwarm", steps=True),
            rounds={
                prm_n: make_groups(
                    renderer, args.groups, prm_n, *size, args.seed, "prm", steps=True
                )
            },
        )
        rm_registry = write_registry(work / "registry-rm.yaml", RM, paths[RM], options)
        rows: list[Row] = []
        failures: list[str] = []

        def attempt(name: str, run: Callable[[], list[Row]]) -> None:
            print(f"running {name} ...", flush=True)
            started = time.perf_counter()
            try:
                rows.extend(run())
            except (ServerFailed, RuntimeError, OSError, httpx.HTTPError) as exc:
                failures.append(f"{name}: {exc}")
                print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
            print(f"{name} done in {time.perf_counter() - started:.0f} s", flush=True)

        if "a" in systems:
            attempt("(a) vLLM direct", lambda: run_vllm(work, paths[RM], options, load))
        if "b" in systems:
            attempt("(b) transformers server", lambda: run_hf(work, paths[RM], load))
        judge: dict[str, Any] = {
            "mode": "listwise",
            "structured_output": True,
            "max_critique_chars": JUDGE_CRITIQUE_CHARS,
            "sampling": {"temperature": 1.0, "max_tokens": judge_max_tokens},
        }
        if shapes:
            base = {
                n: make_groups(renderer, args.groups, n, *size, args.seed, f"n{n}") for n in args.n
            }
            shape_load = ShapeLoad(
                warmup=[
                    group
                    for n in args.n
                    for group in relabel(
                        renderer,
                        make_groups(renderer, WORKERS * 2, n, *size, args.seed, f"warm{n}"),
                        "w",
                    )
                ],
                rounds={
                    n: {
                        shape: [relabel(renderer, groups, f"s{k}r{r}") for r in range(args.repeats)]
                        for k, shape in enumerate(shapes)
                    }
                    for n, groups in base.items()
                },
            )
            registries = {RM: rm_registry}
            server_env = {}
            if args.group_wait_s is not None:
                server_env["RMSERVE_GROUP_WAIT_S"] = str(args.group_wait_s)
            if args.timeout_s is not None:
                server_env["RMSERVE_DEFAULT_TIMEOUT_S"] = str(args.timeout_s)
            if LISTWISE in models:
                registries[LISTWISE] = write_registry(
                    work / "registry-listwise.yaml",
                    LISTWISE,
                    paths["tiny-lm"],
                    options,
                    options=judge,
                )
            for model in models:
                for system in ("c", "d"):
                    if system in systems:
                        attempt(
                            f"({system}) {model}, shapes {','.join(shapes)}",
                            functools.partial(
                                run_shapes,
                                work,
                                system,
                                registries[model],
                                model,
                                shape_load,
                                args.seed,
                                server_env,
                            ),
                        )
        if "c" in systems and not shapes:
            attempt(
                "(c) rmserve serve",
                lambda: run_embedded(
                    work,
                    "c",
                    "rmserve serve",
                    rm_registry,
                    RM,
                    load,
                    "one request per " + ("item" if per_sample else "group"),
                    per_sample,
                ),
            )
        if "d" in systems and not shapes:
            for routing in ROUTINGS:
                attempt(
                    f"(d) distributed, {routing}",
                    functools.partial(
                        run_distributed, work, routing, rm_registry, load, per_sample
                    ),
                )
        if "prm" in systems:
            reusable = accepted("rmserve.models.spec.ProcessOptions", "reuse_prefix")
            for reuse in (True, False):
                process: dict[str, Any] = {
                    "step_tag": STEP_TAG,
                    "steps": "separator",
                    "separator": "\n\n",
                    "aggregate": "min",
                }
                if reusable:
                    process["reuse_prefix"] = reuse
                note = f"reuse_prefix {str(reuse).lower()}" + (
                    "" if reusable else f" {NOT_ACCEPTED}: option left out"
                )
                registry = write_registry(
                    work / f"registry-prm-{reuse}.yaml", PRM, paths[PRM], options, options=process
                )
                system = "prm-reuse" if reuse else "prm-noreuse"
                attempt(
                    f"(prm) reuse_prefix {reuse}",
                    functools.partial(
                        run_embedded,
                        work,
                        system,
                        "rmserve serve, tiny-prm",
                        registry,
                        PRM,
                        prm_load,
                        note,
                    ),
                )

        baseline = {row.n: row.scores for row in rows if row.system == "a"}
        for row in rows:
            if row.system in DIFFED and row.n in baseline and not row.shape:
                pairs = [
                    (x, y)
                    for x, y in zip(baseline[row.n], row.scores, strict=True)
                    if x is not None and y is not None
                ]
                row.max_diff_vs_a = max((abs(x - y) for x, y in pairs), default=None)
        cores, cpu = machine()
        config = json.loads((paths[RM] / "config.json").read_text())
        header = [
            f"machine: {cores} cores ({cpu}); shared with other jobs: figures are indicative",
            f"model: random Llama, hidden {config['hidden_size']}, {config['num_hidden_layers']} "
            f"layers, vocab {config['vocab_size']}, {parameter_count(paths[RM]) / 1e6:.2f} M "
            f"parameters; engine {options.model_dump(exclude_none=True)}",
            f"workload: G={args.groups} groups x n={args.n}, prompt ~{args.prompt_tokens} tokens "
            f"(measured {[g.prompt_tokens for g in next(iter(load.rounds.values()))]}), "
            f"responses {low}-{high} tokens; PRM n={prm_n}",
        ]
        if shapes:
            header += [
                f"shapes {','.join(shapes)} (each on its own groups: the same responses, the "
                "prompt's head relabelled); items carry id, group, group_size: group = one "
                f"request per group, all at once; verl = one request per item from "
                f"{traffic_shapes.VERL_WORKERS} clients (each item to one chosen at random), "
                "each client one request at a time, in the batch's order; openrlhf = one "
                "request per item, all at once",
                f"models {', '.join(models)}"
                + (f"; {LISTWISE}: tiny-lm, {judge}" if LISTWISE in models else "")
                + "; (d): 2 workers, RMSERVE_ROUTING=prefix; group wait "
                + (f"{args.group_wait_s:g} s" if args.group_wait_s else "the server's default")
                + ", request timeout "
                + (f"{args.timeout_s:g} s" if args.timeout_s else "the server's default"),
                "targets: per-sample / group items/s >= 0.9 and computed prompt tokens per item "
                "<= 1.1 (per-sample never more than 10% worse); listwise: complete groups only",
            ]
        found = ratios(rows) + shape_ratios(rows)
        report(rows, found, header)
        for failure in failures:
            print(f"FAILED {failure}", file=sys.stderr)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "header": header,
                        "rows": [{**asdict(row), "items_per_s": row.items_per_s} for row in rows],
                        "ratios": found,
                        "checks": [
                            {"system": row.system, "model": row.model, "n": row.n}
                            | {"shape": row.shape, **check}
                            for row in rows
                            for check in row.checks
                        ],
                        "failures": failures,
                    },
                    indent=2,
                )
            )
    return 1 if failures or any(row.errors for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
