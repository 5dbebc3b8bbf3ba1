"""A judge behind an OpenAI-compatible chat endpoint (`POST {base_url}/chat/completions`).

The judge prompt is sent as the user message (after the item's images as `image_url` parts,
when the registry says the endpoint's model reads images: `vision: true`); the endpoint applies
the judge model's chat template. One `httpx.AsyncClient` is shared by all requests of the
model, at most `max_concurrency` of them in flight at once.

Structured outputs: with `sampling.regex` the request body carries vLLM's extension
`"structured_outputs": {"regex": ...}` (the field of the `ChatCompletionRequest` of vLLM 0.32;
older releases took a top-level `guided_regex`, which 0.32 no longer reads). It works against
vLLM servers only: OpenAI's own API and
most other providers ignore or refuse the unknown field, so there judgements are unconstrained
and may not parse.

Samples: `sampling.n > 1` becomes n requests of one completion each, sent concurrently, so that
each completion's token count is exact (`usage.completion_tokens` of its own request). When a
seed is given, request i uses `seed + i`: n requests with one seed would draw one sample n times.
`Judged.prompt_tokens` is the sum of `usage.prompt_tokens` over those requests (each is a real
prompt the endpoint processed).

Failures are per item (ItemError): `too_long` (the endpoint says the prompt exceeds its
context), `remote_error` (any other 4xx, or a malformed answer), `remote_unavailable` (429, 5xx,
connection errors or timeouts still failing after `max_retries` retries with backoff).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from rmserve.models.engine import Completion, SamplingRequest
from rmserve.models.errors import ModelLoadError
from rmserve.models.generative.backends import Chat, Judged
from rmserve.models.spec import RemoteJudge
from rmserve.wire.errors import ItemError
from rmserve.wire.images import JudgeImage

_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 10.0
_RETRY_AFTER_MAX_S = 30.0
_EXCERPT_CHARS = 300
_TOO_LONG_HINTS = ("context length", "context_length", "maximum context", "too long")


class RemoteBackend:
    """Judgements from a remote OpenAI-compatible endpoint (see the module docstring)."""

    def __init__(self, remote: RemoteJudge, api_key: str | None) -> None:
        self._remote = remote
        self.max_model_len = remote.max_model_len
        self.vision = remote.vision
        self._url = remote.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Bound to the event loop that runs the requests, created there on first use: the
        # loader builds the model in a worker thread, outside that loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._closing: set[asyncio.Future[None]] = set()

    @classmethod
    def from_spec(cls, remote: RemoteJudge) -> RemoteBackend:
        return cls(remote, _api_key(remote))

    # -- judging ---------------------------------------------------------------------------

    async def chat(
        self,
        chat: Chat,
        sampling: SamplingRequest,
        images: Sequence[JudgeImage] = (),
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Judged:
        messages = _openai_messages(chat, images)
        bodies = [self._body(messages, sampling, i, tools) for i in range(sampling.n)]
        tasks = [asyncio.ensure_future(self._complete(body)) for body in bodies]
        try:
            answers = await asyncio.gather(*tasks)
        except BaseException:  # one sample failed the item: stop drawing the others
            for task in tasks:
                task.cancel()
            raise
        return Judged(
            completions=[completion for completion, _ in answers],
            prompt_tokens=sum(prompt_tokens for _, prompt_tokens in answers),
        )

    def _body(
        self,
        messages: list[dict[str, Any]],
        sampling: SamplingRequest,
        index: int,
        tools: Sequence[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._remote.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "n": 1,
        }
        if tools:
            body["tools"] = list(tools)
        if sampling.seed is not None:
            body["seed"] = sampling.seed + index
        if sampling.regex is not None:
            body["structured_outputs"] = {"regex": sampling.regex}
        return body

    async def _complete(self, body: dict[str, Any]) -> tuple[Completion, int]:
        data = await self._post(body)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ItemError(
                "remote_error",
                f"the judge endpoint answered without choices: {_excerpt(json.dumps(data))}",
            )
        choice = choices[0]
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        finish_reason = choice.get("finish_reason")
        text = content if isinstance(content, str) else ""
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):  # the endpoint parsed tool calls: back to the text form
            text += "".join(_tool_call_text(call) for call in calls if isinstance(call, dict))
        completion = Completion(
            text=text,
            tokens=_count(usage.get("completion_tokens")),
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        )
        return completion, _count(usage.get("prompt_tokens"))

    async def _post(self, body: dict[str, Any]) -> Any:
        """The decoded JSON of a 200 answer, retrying 429, 5xx and transport errors."""
        client, semaphore = self._session()
        attempts = self._remote.max_retries + 1
        last = ""
        for attempt in range(attempts):
            delay = min(_BACKOFF_FIRST_S * 2**attempt, _BACKOFF_MAX_S)
            try:
                async with semaphore:
                    response = await client.post(self._url, json=body, headers=self._headers)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                status = response.status_code
                if status == 429 or status >= 500:
                    last = f"HTTP {status}: {_excerpt(response.text)}"
                    retry_after = _retry_after(response)
                    delay = delay if retry_after is None else retry_after
                elif status >= 400:
                    raise _client_error(status, response.text)
                else:
                    try:
                        return response.json()
                    except ValueError:
                        raise ItemError(
                            "remote_error",
                            f"the judge endpoint answered HTTP {status} with a body that is not "
                            f"JSON: {_excerpt(response.text)}",
                        ) from None
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)  # outside the semaphore: waiting holds no slot
        raise ItemError(
            "remote_unavailable",
            f"the judge endpoint {self._url} failed {attempts} attempt(s); last: {last}",
        )

    def _session(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._client is None or self._semaphore is None or self._loop is not loop:
            limit = self._remote.max_concurrency
            self._client = httpx.AsyncClient(
                timeout=self._remote.timeout_s,
                limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
            )
            self._semaphore = asyncio.Semaphore(limit)
            self._loop = loop
        return self._client, self._semaphore

    # -- shutdown --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close the client on its loop if that loop still runs; otherwise just drop it (its
        loop is gone, and so are its connections' transports). Never raises."""
        client, loop = self._client, self._loop
        self._client, self._semaphore, self._loop = None, None, None
        if client is None or loop is None or loop.is_closed() or not loop.is_running():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is loop:
                task = loop.create_task(client.aclose())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            else:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
        except RuntimeError:  # the loop stopped meanwhile
            pass


def _openai_messages(chat: Chat, images: Sequence[JudgeImage]) -> list[dict[str, Any]]:
    """Chat-template-shaped messages as the OpenAI API takes them: image placeholders become
    `image_url` parts (the call's images, in order), tool-call arguments JSON strings."""
    remaining = iter(images)
    messages = []
    for message in chat:
        out = dict(message)
        if isinstance(message.get("content"), list):
            out["content"] = [
                {"type": "image_url", "image_url": {"url": next(remaining).url}}
                if part.get("type") == "image"
                else part
                for part in message["content"]
            ]
        if message.get("tool_calls"):
            out["tool_calls"] = [
                {**call, "function": {**call["function"],
                                      "arguments": json.dumps(call["function"]["arguments"])}}
                for call in message["tool_calls"]
            ]  # fmt: skip
        messages.append(out)
    return messages


def _tool_call_text(call: dict[str, Any]) -> str:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    assert isinstance(function, dict)
    arguments = function.get("arguments", "{}")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = arguments  # kept as given: the judging loop reports it as invalid
    payload = json.dumps({"name": function.get("name"), "arguments": parsed})
    return f"<tool_call>{payload}</tool_call>"


def _api_key(remote: RemoteJudge) -> str | None:
    if remote.api_key_env is not None and remote.api_key_file is not None:
        raise ModelLoadError("remote: give api_key_env or api_key_file, not both")
    if remote.api_key_env is not None:
        key = os.environ.get(remote.api_key_env, "").strip()
        if not key:
            raise ModelLoadError(
                f"the judge endpoint's API key variable {remote.api_key_env} is not set or empty"
            )
        return key
    if remote.api_key_file is not None:
        path = Path(os.path.expandvars(remote.api_key_file)).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                f"cannot read the judge endpoint's API key file {path}: {exc}"
            ) from None
        key = lines[0].strip() if lines else ""
        if not key:
            raise ModelLoadError(
                f"the judge endpoint's API key file {path} has no key on its first line"
            )
        return key
    return None


def _client_error(status: int, text: str) -> ItemError:
    lowered = text.lower()
    if status == 400 and any(hint in lowered for hint in _TOO_LONG_HINTS):
        return ItemError(
            "too_long", f"the judge endpoint refused the prompt as too long: {_excerpt(text)}"
        )
    return ItemError("remote_error", f"the judge endpoint answered HTTP {status}: {_excerpt(text)}")


def _retry_after(response: httpx.Response) -> float | None:
    """A numeric Retry-After header in seconds (capped); an HTTP date is not honored."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, _RETRY_AFTER_MAX_S)


def _excerpt(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _EXCERPT_CHARS else flat[: _EXCERPT_CHARS - 3] + "..."


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
