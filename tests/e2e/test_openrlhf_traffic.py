"""OpenRLHF's reward traffic, as its client really sends it, against a real `rmserve serve` with
auth on: the key in the URL's user info (HTTP Basic), one request per sample, a rollout batch of
samples in flight at once, each attempt on a new connection, 5 attempts a second apart, every
status >= 400 retried and Retry-After ignored. A sample whose 5 attempts fail has no reward (the
training step crashes), so the quota a key needs for this traffic is measured here: the one the
README recommends holds it (every sample rewarded, with the right value), the README's general
example quota does not (samples exhaust their retries).

The gateway's overload limit (RMSERVE_MAX_CONCURRENT_REQUESTS, default 512 requests at once) is
the other limit per-sample traffic meets: beyond it requests are shed with 429 `overloaded`,
which OpenRLHF retries; whether the shed samples get in within their 5 attempts depends on how
fast the model drains the admitted ones. Measured here with the weight-free `math` verifier (no
engine: the gateway's auth, quotas and shedding, fast) and with tiny-rm on a real vLLM CPU engine
(slower than the retry window: samples are lost). The summaries are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from rmserve.service.auth import hash_key, new_key
from rmserve.service.launcher import ServerProcess

REGISTRY = "models:\n  math:\n    kind: math\n"  # as in tests/registry.verifiers.yaml
KEY = new_key()
# What the README recommends for OpenRLHF's per-sample traffic: no request rate limit (a
# rollout batch arrives at once), and items in flight bounded at twice the rollout batch x
# n_samples_per_prompt (headroom for the items of requests the trainer gave up on, which hold
# their lease until they finish).
RECOMMENDED = "requests_per_s: null\n    max_concurrent_items: {items}"
# The README's example quota (Authentication and quotas), fine for batching clients.
EXAMPLE = "requests_per_s: 20\n    burst: 40"


@dataclass
class Traffic:
    """What the trainer's client saw: a reward (or None: retries exhausted) per sample, the
    failed attempts by cause, and the attempts each sample took."""

    rewards: list[float | None] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    attempts: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def exhausted(self) -> int:
        return sum(reward is None for reward in self.rewards)

    def summary(self) -> str:
        retried = sum(n for tries, n in self.attempts.items() if tries > 1)
        return (
            f"{len(self.rewards)} samples in {self.seconds:.1f} s "
            f"({len(self.rewards) / self.seconds:.0f}/s): {self.exhausted} exhausted their "
            f"retries, {retried} needed more than one attempt (attempts per sample: "
            f"{dict(sorted(self.attempts.items()))}); failed attempts: {dict(self.failures)}"
        )


# Copied from OpenRLHF v0.11.0 (commit 3c3be6234e0cb353e76bb8019947db9dfe99fca7),
# openrlhf/utils/agent.py:338-353: `_post_request`, inside
# SingleTurnAgentExecutor._fetch_rewards_via_http (agent.py:322-356), which agent.py:287 calls
# once per sample. A new aiohttp.ClientSession (a new TCP connection) per attempt, 180 s total
# timeout (agent.py:325), raise_for_status() (any status >= 400, 429 included, is retried;
# Retry-After is not read), 5 attempts with asyncio.sleep(1) between. Changed only to record
# each attempt where OpenRLHF logs it (`logger.info(f"Request error, please check: {e}")`).
async def _post_request(
    url: str, data: dict[str, Any], traffic: Traffic, try_max_times: int = 5
) -> Any:
    timeout = aiohttp.ClientTimeout(total=180)
    for attempt in range(try_max_times):
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:  # noqa: SIM117
                async with session.post(url, json=data) as response:
                    response.raise_for_status()
                    traffic.attempts[attempt + 1] += 1
                    return await response.json()
        except aiohttp.ClientResponseError as e:  # an aiohttp.ClientError
            traffic.failures[str(e.status)] += 1
        except aiohttp.ClientError as e:
            traffic.failures[type(e).__name__] += 1
        except Exception as e:  # pragma: no cover - defensive
            traffic.failures[type(e).__name__] += 1
        await asyncio.sleep(1)
    traffic.attempts[try_max_times + 1] += 1  # (one more than allowed: no reward)
    raise RuntimeError(
        f"Request error for {try_max_times} times, returning None. Please check the API server."
    )


def sample(i: int) -> tuple[dict[str, list[str]], float]:
    """Sample i's request body (agent.py:287 and 331-336: `{"query": [query], "prompts":
    [prompt], "labels": [label]}`, the query being prompt + response) and the reward it should
    get: the even ones answer right (1.0), the odd ones wrong (0.0)."""
    a, b = i % 97, i % 89
    prompt = f"Question {i}: what is {a} + {b}? Put the answer in \\boxed{{}}.\nAnswer:"
    answer = a + b if i % 2 == 0 else a + b + 1
    response = f" {a} plus {b} makes \\boxed{{{answer}}}"
    body = {"query": [prompt + response], "prompts": [prompt], "labels": [str(a + b)]}
    return body, 1.0 if i % 2 == 0 else 0.0


async def rollout(url: str, steps: int, samples_per_step: int, padding: int = 0) -> Traffic:
    """`steps` rollout steps of `samples_per_step` samples each (rollout_batch_size x
    n_samples_per_prompt), every sample's reward request sent at once, as vLLM's generations
    finish in OpenRLHF (no client-side limit); a step ends when all its samples are done.
    `padding`: words added to each response (a longer query, slower to score)."""
    traffic = Traffic()
    started = time.monotonic()
    for step in range(steps):
        first = step * samples_per_step
        bodies = [sample(i)[0] for i in range(first, first + samples_per_step)]
        for body in bodies:
            body["query"] = [body["query"][0] + " and so on" * (padding // 3)]
        answers = await asyncio.gather(
            *(_post_request(url, body, traffic) for body in bodies), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, RuntimeError):
                traffic.rewards.append(None)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                (reward,) = answer["rewards"]
                traffic.rewards.append(reward)
    traffic.seconds = time.monotonic() - started
    return traffic


@contextmanager
def serving(
    tmp_path: Path,
    quota: str,
    env: dict[str, str] | None = None,
    registry_text: str = REGISTRY,
    model: str = "math",
) -> Iterator[str]:
    """A real `rmserve serve` (`model` as OpenRLHF's model) with one API key, `openrlhf`, under
    `quota`; yields the reward URL with the key in its user info, the way OpenRLHF is given it
    (`--reward.remote_url http://openrlhf:KEY@host:port/get_reward`)."""
    registry = tmp_path / "registry.yaml"
    registry.write_text(registry_text)
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - name: openrlhf\n    sha256: {hash_key(KEY)}\n    {quota}\n")
    env = {"RMSERVE_API_KEYS_FILE": str(keys), "RMSERVE_OPENRLHF_MODEL": model, **(env or {})}
    server = ServerProcess(registry, tmp_path / "server.log", env=env)
    try:
        server.wait_ready(600)  # (wait_settled reads /v1/models, which needs the key)
        models = httpx.get(
            f"{server.base_url}/v1/models", headers={"authorization": f"Bearer {KEY}"}
        )
        assert [(m["name"], m["status"]) for m in models.json()["data"]] == [(model, "ready")]
        yield server.base_url.replace("http://", f"http://openrlhf:{KEY}@") + "/get_reward"
    finally:
        server.stop()


def server_counts(reward_url: str) -> dict[str, float]:
    """What the server answered on /get_reward (200s, 429s), the 429s of the key's quota by
    limit (the other 429s were shed by RMSERVE_MAX_CONCURRENT_REQUESTS: `overloaded`), and
    the requests whose key it refused (401)."""
    base_url = re.sub(r"//[^@/]*@", "//", reward_url.removesuffix("/get_reward"))
    text = httpx.get(f"{base_url}/metrics").text

    def total(name: str, labels: str) -> float:
        pattern = rf"^{name}_total\{{{labels}\}} (\S+)$"
        return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))

    def http(code: int) -> float:
        return total("rmserve_http_requests", f'code="{code}",route="/get_reward"')

    counts = {"200": http(200), "429": http(429), "401": http(401)}
    for limit in ("rate", "concurrency"):
        counts[limit] = total("rmserve_quota_rejections", f'limit="{limit}"')
    counts["overloaded"] = counts["429"] - counts["rate"] - counts["concurrency"]
    return counts


def expected(samples: int) -> list[float]:
    return [sample(i)[1] for i in range(samples)]


def test_openrlhf_traffic_at_the_recommended_quota_gets_every_reward(tmp_path: Path) -> None:
    steps, in_flight = 4, 512  # 2048 samples: e.g. rollout_batch_size 128 x n_samples 4
    with serving(tmp_path, RECOMMENDED.format(items=2 * in_flight)) as url:
        traffic = asyncio.run(rollout(url, steps, in_flight))
        counts = server_counts(url)
    print(f"\nrecommended quota: {traffic.summary()}; server: {counts}")
    assert traffic.exhausted == 0, traffic.summary()
    assert traffic.rewards == expected(steps * in_flight), traffic.summary()
    assert counts["rate"] == counts["concurrency"] == counts["401"] == 0, counts
    assert counts["200"] == steps * in_flight, counts  # every attempt authenticated by Basic


def test_openrlhf_traffic_at_the_example_quota_exhausts_retries(tmp_path: Path) -> None:
    # 20 requests/s, burst 40: while the 5 attempts of a batch's samples last (~4-5 s), a key
    # is admitted at most 40 + 20 per second of it, and the rest of the batch gets no reward.
    samples = 256
    with serving(tmp_path, EXAMPLE) as url:
        traffic = asyncio.run(rollout(url, 1, samples))
        counts = server_counts(url)
    print(f"\nexample quota: {traffic.summary()}; server: {counts}")
    rewarded = samples - traffic.exhausted
    assert traffic.exhausted > 0, traffic.summary()
    assert rewarded <= 40 + 20 * traffic.seconds + 1, traffic.summary()  # the bucket's bound
    assert traffic.failures == Counter({"429": counts["rate"]}), (traffic.summary(), counts)
    # The samples that got through have the right rewards: a refusal never became a 0.0.
    assert counts["200"] == samples - traffic.exhausted, counts
    for got, want in zip(traffic.rewards, expected(samples), strict=True):
        assert got is None or got == want


def test_more_samples_in_flight_than_max_concurrent_requests_are_shed_and_retried(
    tmp_path: Path,
) -> None:
    """2048 samples at once against the default RMSERVE_MAX_CONCURRENT_REQUESTS (512): the
    gateway sheds what is beyond it with 429 `overloaded`, which OpenRLHF retries a second
    later. Whether every sample gets through within its 5 attempts depends on how fast the
    model drains the 512 (measured and printed, not asserted)."""
    in_flight = 2048
    with serving(tmp_path, RECOMMENDED.format(items=2 * in_flight)) as url:
        traffic = asyncio.run(rollout(url, 1, in_flight))
        counts = server_counts(url)
    print(f"\ndefault max_concurrent_requests: {traffic.summary()}; server: {counts}")
    assert traffic.failures["429"] > 0, traffic.summary()
    assert counts["overloaded"] == counts["429"] == traffic.failures["429"], counts
    assert counts["200"] == in_flight - traffic.exhausted, counts
    for got, want in zip(traffic.rewards, expected(in_flight), strict=True):
        assert got is None or got == want


def test_max_concurrent_requests_above_the_samples_in_flight_sheds_nothing(
    tmp_path: Path,
) -> None:
    in_flight = 2048
    env = {"RMSERVE_MAX_CONCURRENT_REQUESTS": str(2 * in_flight)}
    with serving(tmp_path, RECOMMENDED.format(items=2 * in_flight), env) as url:
        traffic = asyncio.run(rollout(url, 1, in_flight))
        counts = server_counts(url)
    print(f"\nmax_concurrent_requests {2 * in_flight}: {traffic.summary()}; server: {counts}")
    assert traffic.exhausted == 0 and not traffic.failures, traffic.summary()
    assert traffic.rewards == expected(in_flight), traffic.summary()
    assert counts["429"] == 0 and counts["200"] == in_flight, counts


TINY_RM = """models:
  tiny-rm:
    kind: discriminative
    weights: ${RMSERVE_TINY_MODELS}/tiny-rm
    engine: {max_model_len: 2048, dtype: float32, kv_cache_gib: 0.25, enforce_eager: true}
"""  # as in tests/registry.verifiers.yaml


@pytest.mark.engine
def test_a_model_slower_than_the_retry_window_loses_the_shed_samples(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """1024 samples of ~1200 tokens at once, the default RMSERVE_MAX_CONCURRENT_REQUESTS
    (512), a reward model on a real vLLM CPU engine (tiny-rm, ~50 samples/s here): the 512
    admitted take longer to score than OpenRLHF's 5 attempts a second apart last, so samples
    shed with 429 `overloaded` exhaust their retries. (The same 1024 against a limit of 4096
    all got rewards on the first attempt, measured outside the suite.)"""
    in_flight = 1024
    env = {"VLLM_LOGGING_LEVEL": "WARNING"}
    quota = RECOMMENDED.format(items=2 * in_flight)
    with serving(tmp_path, quota, env, registry_text=TINY_RM, model="tiny-rm") as url:
        traffic = asyncio.run(rollout(url, 1, in_flight, padding=900))
        counts = server_counts(url)
    print(f"\ntiny-rm, default max_concurrent_requests: {traffic.summary()}; server: {counts}")
    assert traffic.attempts[1] == 512, traffic.summary()  # exactly the limit got in at once
    assert traffic.exhausted > 0, traffic.summary()
    assert counts["overloaded"] == counts["429"] == traffic.failures["429"], counts
    assert counts["200"] == in_flight - traffic.exhausted, counts
    assert all(isinstance(r, float) for r in traffic.rewards if r is not None)
