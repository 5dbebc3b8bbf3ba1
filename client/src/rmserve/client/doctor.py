"""`rmserve-client doctor URL`: send one sample to a `/get_reward` URL the way OpenRLHF does and
say what the trainer would get: the reward, or the error the service answered with what to do.

OpenRLHF (0.11, openrlhf/utils/agent.py:322-356) posts each sample alone to the URL it is given,
`{"query": [prompt + response], "prompts": [prompt], "labels": [label]}` (a key in the URL's user
info goes as HTTP Basic), retries any status >= 400 five times a second apart and logs only the
status line; it then turns `rewards[0]`, `scores[0]` and the first of each `extra_logs` list into
tensors, so each must be a number. A sample without one has no reward, and the step fails later.

Exit codes: 0 the sample is scored; 1 it is not (an error, a null reward, or the `on_error`
number instead of a score); 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

PROG = "rmserve-client doctor"
OPENRLHF_TIMEOUT_S = 180.0  # agent.py:325
PROMPT = "What is 2 + 2? Put the final answer in \\boxed{}."
RESPONSE = " 2 + 2 = 4, so the answer is \\boxed{4}."
RETRIES = (
    "OpenRLHF logs only the status line of this answer, tries 4 more times a second apart, and "
    "the sample then has no reward: the step fails later (in concat_experiences)."
)


@dataclass(frozen=True)
class Verdict:
    scored: bool
    lines: list[str]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="send one sample to a /get_reward URL as OpenRLHF does and say what the "
        "trainer would get",
    )
    p.add_argument("url", help="the URL given to OpenRLHF (--reward.remote_url), key included")
    p.add_argument("--prompt", default=PROMPT, help="the sample's prompt (`prompts[0]`)")
    p.add_argument("--response", default=RESPONSE, help="the actor's response")
    p.add_argument(
        "--query",
        help="the whole query as OpenRLHF sends it (the actor's decoded tokens, chat template "
        "included); default: prompt + response",
    )
    p.add_argument(
        "--label",
        default='"4"',
        help="the dataset's label as JSON (text that is not JSON is sent as a string; '' is no "
        "label)",
    )
    p.add_argument("--timeout-s", type=float, default=OPENRLHF_TIMEOUT_S)
    return p


def doctor_main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors and --help
        return exc.code if isinstance(exc.code, int) else 2
    if urlsplit(args.url).scheme not in ("http", "https"):
        print(f"{PROG}: the URL must start with http:// or https://", file=sys.stderr)
        return 2
    query = args.query if args.query is not None else args.prompt + args.response
    body = {"query": [query], "prompts": [args.prompt], "labels": [_label(args.label)]}
    print(f"POST {redacted(args.url)}\n  {_shown(body)}")
    verdict = diagnose(args.url, body, args.timeout_s)
    print("\n".join(verdict.lines))
    return 0 if verdict.scored else 1


def diagnose(url: str, body: dict[str, Any], timeout_s: float) -> Verdict:
    """What OpenRLHF would get for `body`, posted once to `url`."""
    try:
        with httpx.Client(timeout=timeout_s) as client:  # user info: HTTP Basic, as aiohttp
            response = client.post(url, json=body)
    except httpx.HTTPError as exc:
        return Verdict(
            False,
            [
                f"cannot reach {redacted(url)}: {type(exc).__name__}: {exc}",
                "what to do: start the service there (rmserve serve) and check that the "
                "trainer's nodes reach this host and port.",
                RETRIES,
            ],
        )
    if response.status_code >= 400:
        return _refused(response)
    return _answered(response)


def _refused(response: httpx.Response) -> Verdict:
    status = f"{response.status_code} {response.reason_phrase}"
    error = _error(response)
    if error is None:
        return Verdict(False, [f"{status}: {response.text[:300]!r}", _not_rmserve(), RETRIES])
    kind, param, message = (str(error.get(k) or "") for k in ("type", "param", "message"))
    where = f" (param {param})" if param else ""
    lines = [f"{status}: {kind}{where}: {message}"]
    if hint := advice(response.status_code, kind, param, message):
        lines.append(f"what to do: {hint}")
    return Verdict(False, [*lines, RETRIES])


def _answered(response: httpx.Response) -> Verdict:
    status = f"{response.status_code} {response.reason_phrase}"
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if not isinstance(payload, dict) or not isinstance(payload.get("rewards"), list):
        answer = f"{status}, but no `rewards` list: {response.text[:300]!r}"
        return Verdict(False, [answer, _not_rmserve()])
    reward, score = _first(payload.get("rewards")), _first(payload.get("scores"))
    logs = {name: _first(v) for name, v in (payload.get("extra_logs") or {}).items()}
    shown = ", ".join(f"{name} {value}" for name, value in logs.items())
    lines = [f"{status}: reward {reward}, score {score}; extra_logs: {shown or 'none'}"]
    fields = {"rewards": reward, "scores": score, **logs}
    not_numbers = [name for name, value in fields.items() if not _number(value)]
    if not_numbers:
        lines += [
            f"OpenRLHF cannot take this answer: {', '.join(not_numbers)} not a number (it "
            "turns each into a tensor: 'Could not infer dtype of NoneType')",
            "what to do: remove on_error=report from the URL (an older rmserve accepts it); "
            "the default, fail, answers the cause as an error instead",
        ]
        return Verdict(False, lines)
    errors = payload.get("errors") or [None]
    if errors[0] is not None:  # the URL's ?on_error=<number>: a made-up reward, flagged
        failure = errors[0] if isinstance(errors[0], dict) else {}
        lines += [
            f"not scored: {failure.get('type')}: {failure.get('message')}",
            f"OpenRLHF would get the on_error reward {reward} for it (extra_logs rmserve_error "
            "1), not a score",
        ]
        return Verdict(False, lines)
    return Verdict(True, [*lines, f"OpenRLHF would get the reward {reward} for this sample."])


def advice(status: int, kind: str, param: str, message: str) -> str | None:
    """What to change for an error the service answered, when it is a known cause."""
    if status == 401:
        return (
            "put the API key in the URL's user info, http://NAME:KEY@host:port/get_reward "
            "(percent-encode a key with other characters than A-Za-z0-9_-)"
        )
    if param == "on_error":
        return "drop on_error from the URL (fail, the default) or give a number"
    if param == "model":
        if status == 403:
            return "use a key that may use this model (rmserve api-key --models), or its model"
        if status == 404:
            return "name a model of the registry in ?model=NAME (GET /v1/models lists them)"
        if status == 503:
            return "wait until the model is ready (GET /v1/models says why it is not)"
        return "set RMSERVE_OPENRLHF_MODEL=NAME on the server, or add ?model=NAME to the URL"
    if param.startswith("labels["):
        return (
            "the dataset's label is not one rmserve reads: a string or a number (the "
            "reference), a list (code tests) or an object (reference, tests, documents, "
            "metadata); check which dataset key OpenRLHF reads labels from (its label_key)"
        )
    if "missing_reference" in message:
        return (
            "the sample has no label, and the model needs the reference answer: point "
            "OpenRLHF's label_key at the dataset key that holds it"
        )
    if "invalid_query" in message:
        return "add ?query_format=raw (verbatim) or plain (split at the prompt) to the URL"
    if status == 404 and not param:
        return "the URL's path must be /get_reward"
    if status == 429:
        return (
            "the key's quota or the gateway's capacity refused it: admit a whole rollout "
            "batch at once (README: Sizing for OpenRLHF's traffic)"
        )
    if status == 503:
        return "the service could not score it now; its log and GET /v1/models say why"
    return None


def redacted(url: str) -> str:
    """The URL with the password of its user info (the API key) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _label(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _shown(body: dict[str, Any], limit: int = 300) -> str:
    text = json.dumps(body, ensure_ascii=False)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _error(response: httpx.Response) -> dict[str, Any] | None:
    try:
        payload = response.json()
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else None


def _first(values: Any) -> Any:
    return values[0] if isinstance(values, list) and values else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _not_rmserve() -> str:
    return "what to do: check that the URL is rmserve's /get_reward (http://host:port/get_reward)"
