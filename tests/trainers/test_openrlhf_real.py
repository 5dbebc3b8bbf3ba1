"""OpenRLHF 0.11.2 itself, not a copy of its client code, against a real `rmserve serve`.

OpenRLHF is installed for real into a virtualenv of its own (`pip install openrlhf==0.11.2
--no-deps`, plus only what its reward path imports: aiohttp, and torch, transformers, sympy and
pylatexenc for `openrlhf/utils/__init__.py` and the tokenizer call's `return_tensors="pt"`; and
the rmserve client, `pip install ./client`, never the server). The venv is cached outside the
clone (tests/trainers/venvs.py) under a hash of what goes into it; the checkout's client code
comes first on PYTHONPATH (client_env), so the reward function under test is always the
checkout's.
tests/trainers/openrlhf_driver.py runs there and drives OpenRLHF's `SingleTurnAgentExecutor`
(openrlhf/utils/agent.py:188-365), 64 samples at a time concurrently as a rollout worker does;
only the policy's generation is stood in for (fixed response tokens instead of vLLM).

What OpenRLHF 0.11.2 does with the answer: `output["reward"]` is the `rewards` value of the
first answer as it is, here a list of one float (a tensor of shape (1, 1) later); any exception
on the reward path (5 failed tries of an HTTP request, 4xx included, 1 s apart; or the reward
function raising) is logged at INFO and the sample keeps `reward` None. (Further on, read and not
run here: that sample's Experience has `rewards` None, and the step fails in
Experience.concat_experiences or experience_maker.py:139-142, "reward_model_group is required
when rewards are not precomputed", an error that does not name the cause: that is in OpenRLHF's
INFO lines and in rmserve's log, at WARNING.)
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.service.launcher import ServerProcess
from tests.conftest import start_server
from tests.service.actor_text import QWEN25, actor_tokenizer
from tests.trainers.venvs import VenvBuildFailed, client_env, trainer_venv

pytestmark = pytest.mark.engine

OPENRLHF = "0.11.2"
VERSION_ID = f"openrlhf-{OPENRLHF}"
REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client"
DRIVER = Path(__file__).with_name("openrlhf_driver.py")
# Installed without their dependencies: OpenRLHF's own (deepspeed, ray, vllm, flash-attn, ...)
# are not on the reward path.
NO_DEPS = [f"openrlhf=={OPENRLHF}"]
# torch: the project's own CPU build (the reward path only imports it); transformers: the
# version OpenRLHF 0.11.2 pins.
WITH_DEPS = [
    f"torch=={importlib.metadata.version('torch')}",
    "transformers==5.15.0",
    "aiohttp",
    "sympy",
    "pylatexenc",
    # and ./client (CLIENT)
]
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
REGISTRY = """\
models:
  tiny-rm:
    kind: discriminative
    weights: ${RMSERVE_TINY_MODELS}/tiny-rm
    engine: {max_model_len: 1024, dtype: float32, kv_cache_gib: 0.25, enforce_eager: true}
    options: {too_long: error}
  math:
    kind: math
"""
GROUP = 4  # n_samples_per_prompt: each prompt's samples are consecutive, as OpenRLHF sends them


# --- the virtualenv ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openrlhf_python() -> Path:
    try:
        venv, seconds = trainer_venv(VERSION_ID, WITH_DEPS, no_deps=NO_DEPS)
    except VenvBuildFailed as exc:
        pytest.fail(str(exc))
    print(f"\n{VERSION_ID} venv {venv}: " + (f"built in {seconds:.1f}s" if seconds else "cached"))
    return venv / "bin" / "python"


# --- the services -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(
    tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """tiny-rm (the default model of /get_reward) and the math verifier."""
    workdir = tmp_path_factory.mktemp("openrlhf-real")
    registry = workdir / "registry.yaml"
    registry.write_text(REGISTRY)
    env = {"VLLM_LOGGING_LEVEL": "WARNING", "RMSERVE_OPENRLHF_MODEL": "tiny-rm"}
    server = start_server(registry, workdir, env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second service with the math verifier only: OpenRLHF's second reward URL."""
    workdir = tmp_path_factory.mktemp("openrlhf-real-replica")
    registry = workdir / "registry.yaml"
    registry.write_text("models:\n  math:\n    kind: math\n")
    server = start_server(registry, workdir, {"RMSERVE_OPENRLHF_MODEL": "math"})
    try:
        yield server
    finally:
        server.stop()


def get_reward_count(server: ServerProcess) -> float:
    """POST /get_reward requests the service answered 200 (its Prometheus counter)."""
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rmserve_http_requests_total{")
        and 'route="/get_reward"' in line
        and 'code="200"' in line
    )


# --- the samples ------------------------------------------------------------------------------


def samples() -> list[dict[str, Any]]:
    """64 samples: 16 prompts, 4 responses each, right and wrong answers, labels as a dataset
    has them (strings and numbers)."""
    out: list[dict[str, Any]] = []
    for p in range(64 // GROUP):
        a, b = 3 + 7 * p, 11 + 5 * p
        question = f"What is {a} + {b}? Put the answer in a box."
        label: Any = str(a + b) if p % 2 else a + b
        for s in range(GROUP):
            answer = a + b + (s % 3 == 1)
            response = f"{a} + {b} = {answer}.\n\nThe answer is \\boxed{{{answer}}}."
            if s == 3:
                response = f"Adding: {a} + {b} gives {answer}. Final: \\boxed{{{answer}}}"
            out.append(
                {
                    "conversation": [{"role": "user", "content": question}],
                    "response": response,
                    "label": label,
                }
            )
    return out


def scoring_item(sample: dict[str, Any]) -> dict[str, Any]:
    """The /v1/score item of a sample: the conversation the actor's chat template wrote (Qwen2.5
    adds its default system turn) and the label as the reference."""
    messages = [
        {"role": "system", "content": QWEN_SYSTEM},
        *sample["conversation"],
        {"role": "assistant", "content": sample["response"]},
    ]
    item: dict[str, Any] = {"messages": messages}
    if sample["label"] not in (None, ""):
        item["reference"] = str(sample["label"])
    return item


def v1_score(server: ServerProcess, model: str, batch: list[dict[str, Any]]) -> list[float]:
    scores: list[float] = []
    with httpx.Client(base_url=server.base_url, timeout=300) as client:
        for start in range(0, len(batch), 16):
            items = [scoring_item(s) for s in batch[start : start + 16]]
            response = client.post("/v1/score", json={"model": model, "items": items})
            assert response.status_code == 200, response.text
            for result in response.json()["results"]:
                assert result["error"] is None, result
                scores.append(result["score"])
    return scores


# --- one run of OpenRLHF over every case ------------------------------------------------------

GOOD: dict[str, Any] = {"conversation": [{"role": "user", "content": "What is 2 + 2?"}],
        "response": "2 + 2 = 4. \\boxed{4}", "label": "4"}  # fmt: skip
# A dataset row without its answer (OpenRLHF sends "" when --data.label_key is unset) and one
# whose label is a boolean.
NO_LABEL: dict[str, Any] = {**GOOD, "label": ""}
BOOLEAN_LABEL: dict[str, Any] = {**GOOD, "label": True}
UNSCORABLE = [NO_LABEL, BOOLEAN_LABEL, GOOD]


@pytest.fixture(scope="module")
def openrlhf(
    openrlhf_python: Path,
    service: ServerProcess,
    replica: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Every case in one run of the driver (importing OpenRLHF and torch takes seconds)."""
    workdir = tmp_path_factory.mktemp("openrlhf-driver")
    tokenizer = workdir / "qwen2.5-actor"
    actor_tokenizer(QWEN25).save_pretrained(tokenizer)
    reward_file = subprocess.run(
        [str(openrlhf_python), "-c", "import rmserve.client.openrlhf as m; print(m.__file__)"],
        capture_output=True, text=True, check=True, timeout=120, env=client_env(),
    ).stdout.strip()  # fmt: skip
    url = f"{service.base_url}/get_reward"
    func_env = {"RMSERVE_URL": service.base_url, "RMSERVE_ON_ERROR": None}
    batch = samples()

    def case(name: str, remote: str | list[str], cases: list[dict[str, Any]], **env: Any) -> Any:
        return {"id": name, "remote_rm_url": remote, "env": env, "samples": cases,
                "max_length": 1024, "max_tokens": 256}  # fmt: skip

    runs = [
        case("url-math", [f"{url}?model=math", f"{replica.base_url}/get_reward"], batch),
        case("url-tiny-rm", [url, f"{url}?model=tiny-rm"], batch),
        case("url-math-group", f"{url}?model=math&group_size={GROUP}", batch),
        case("func-math", reward_file, batch, **func_env, RMSERVE_MODEL="math"),
        case("func-tiny-rm", reward_file, batch, **func_env, RMSERVE_MODEL=None),
        case("url-unscorable", f"{url}?model=math", UNSCORABLE),
        case("url-unknown-model", f"{url}?model=no-such-model", [GOOD]),
        case("func-unscorable-raise", reward_file, UNSCORABLE, **func_env, RMSERVE_MODEL="math"),
        case(
            "func-unscorable-number",
            reward_file,
            UNSCORABLE,
            **{**func_env, "RMSERVE_ON_ERROR": "-1"},
            RMSERVE_MODEL="math",
        ),
    ]
    spec = {"openrlhf_version": OPENRLHF, "tokenizer": str(tokenizer), "runs": runs}
    (workdir / "spec.json").write_text(json.dumps(spec))
    before = {"service": get_reward_count(service), "replica": get_reward_count(replica)}
    started = time.monotonic()
    done = subprocess.run(
        [str(openrlhf_python), str(DRIVER), str(workdir / "spec.json"), str(workdir / "out.json")],
        capture_output=True, text=True, timeout=600, cwd=workdir, env=client_env(),
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"driver failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    out: dict[str, Any] = json.loads((workdir / "out.json").read_text())
    out["requests"] = {
        "service": get_reward_count(service) - before["service"],
        "replica": get_reward_count(replica) - before["replica"],
    }
    timings = ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in out["runs"].items())
    print(f"\n{VERSION_ID} driver: {seconds:.1f}s ({timings})")
    out["stdout"] = done.stdout
    out["reward_file"] = reward_file
    return out


def test_it_is_openrlhf_installed(openrlhf: dict[str, Any], openrlhf_python: Path) -> None:
    assert openrlhf["openrlhf_version"] == OPENRLHF
    assert Path(openrlhf["agent_file"]).is_relative_to(openrlhf_python.parents[1])
    # README: --reward.remote_url $(python -c "import rmserve.client.openrlhf as m; ...")
    assert Path(openrlhf["reward_file"]) == CLIENT / "src" / "rmserve" / "client" / "openrlhf.py"


# --- (1, 2) the rewards are /v1/score's ---------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "model"),
    [
        ("url-math", "math"),
        ("url-tiny-rm", "tiny-rm"),
        ("url-math-group", "math"),
        ("func-math", "math"),
        ("func-tiny-rm", "tiny-rm"),
    ],
    ids=lambda value: f"{VERSION_ID}-{value}" if value.startswith(("url", "func")) else value,
)
def test_each_reward_is_the_score_of_its_item(
    openrlhf: dict[str, Any], service: ServerProcess, run: str, model: str
) -> None:
    batch = samples()
    expected = v1_score(service, model, batch)
    outputs = openrlhf["runs"][run]["outputs"]
    assert len(outputs) == len(batch)
    for output, sample, score in zip(outputs, batch, expected, strict=True):
        # OpenRLHF's query: the actor's tokens decoded with their special tokens.
        assert output["query"].startswith("<|im_start|>system\n" + QWEN_SYSTEM)
        assert output["query"].endswith(sample["response"] + "<|im_end|>")
        assert not output["truncated"] and output["rollout_log_probs"] > 0
        # OpenRLHF keeps the answer's `rewards` as it is: one sample, a list of one.
        assert output["reward"] == [pytest.approx(score, abs=1e-5)], output
        assert output["scores"] == [pytest.approx(score, abs=1e-5)], output
        if run.startswith("func"):
            assert output["extra_logs"]["rmserve_error"] == [0.0]
    if model == "math":  # right answers 1, wrong ones 0
        assert [o["reward"][0] for o in outputs] == [float(i % 4 != 1) for i in range(64)]
    assert not [line for line in openrlhf["runs"][run]["logs"] if "rror" in line[1]]


def test_the_urls_take_turns(openrlhf: dict[str, Any]) -> None:
    """0.11.2 cycles through its URLs call by call (agent.py:338-339): with two, each of the 64
    one-sample requests of url-math went to one of them, half to each (the other runs sent theirs
    to the first service only)."""
    assert openrlhf["requests"]["replica"] == 32
    # and the first service the other 32, then 64 each of url-tiny-rm and url-math-group
    assert openrlhf["requests"]["service"] >= 32 + 64 + 64


# --- (3) an item that cannot be scored ----------------------------------------------------------


def warnings_of(server: ServerProcess) -> list[str]:
    return [
        line
        for line in server.log_path.read_text(errors="replace").splitlines()
        if "WARNING" in line and "/get_reward" in line
    ]


def test_url_form_a_failed_item_has_no_reward_and_the_service_says_why(
    openrlhf: dict[str, Any], service: ServerProcess
) -> None:
    """The service fails the request (422: on_error=fail, OpenRLHF cannot take a null reward);
    OpenRLHF tries it 5 times, logs the status line only, at INFO, and leaves the reward None.
    The cause is in the service's log, at WARNING, once per try."""
    run = openrlhf["runs"]["url-unscorable"]
    rewards = [output["reward"] for output in run["outputs"]]
    assert rewards == [None, None, [1.0]], rewards
    failed = [message for level, message in run["logs"] if "Failed to fetch reward" in message]
    assert len(failed) == 2 and all(level == "INFO" for level, _ in run["logs"]), run["logs"]
    tries = [message for _, message in run["logs"] if message.startswith("Request error")]
    assert len(tries) == 10 and all("422" in message for message in tries), tries
    log = warnings_of(service)
    missing = [line for line in log if "422" in line and "missing_reference" in line]
    boolean = [line for line in log if "labels[0]" in line and "boolean label" in line]
    assert len(missing) == 5 and len(boolean) == 5, "\n".join(log)


def test_url_form_an_unknown_model_is_named_in_the_service_log(
    openrlhf: dict[str, Any], service: ServerProcess
) -> None:
    run = openrlhf["runs"]["url-unknown-model"]
    assert [output["reward"] for output in run["outputs"]] == [None]
    tries = [message for _, message in run["logs"] if message.startswith("Request error")]
    assert len(tries) == 5 and all("404" in message for message in tries), run["logs"]
    named = [line for line in warnings_of(service) if "no-such-model" in line]
    assert len(named) == 5 and all("404" in line for line in named), warnings_of(service)


def test_function_form_a_failed_item_raises_and_openrlhf_logs_it_at_info(
    openrlhf: dict[str, Any], service: ServerProcess
) -> None:
    """RMSERVE_ON_ERROR=raise (the default): the failed sample's reward_func call raises, which
    OpenRLHF's `except Exception` (agent.py:303-304) catches and logs at INFO: no reward, and
    no failed step either."""
    run = openrlhf["runs"]["func-unscorable-raise"]
    rewards = [output["reward"] for output in run["outputs"]]
    assert rewards == [None, None, [1.0]], rewards
    failed = [message for level, message in run["logs"] if level == "INFO" and "Failed" in message]
    assert len(failed) == 2, run["logs"]
    assert any("missing_reference" in message for message in failed), failed
    assert any("boolean label" in message for message in failed), failed
    log = warnings_of(service)
    assert any("not scored, answered with reward null" in line and "missing_reference" in line
               for line in log), "\n".join(log)  # fmt: skip


def test_function_form_a_number_policy_rewards_the_failed_item_and_flags_it(
    openrlhf: dict[str, Any],
) -> None:
    """RMSERVE_ON_ERROR=-1: the sample with no label gets -1, flagged in extra_logs; a label the
    service refuses (422 naming labels[i]) still raises in its own call only."""
    run = openrlhf["runs"]["func-unscorable-number"]
    no_label, boolean, good = run["outputs"]
    assert no_label["reward"] == [-1.0] and no_label["extra_logs"]["rmserve_error"] == [1.0]
    assert boolean["reward"] is None
    assert good["reward"] == [1.0] and good["extra_logs"]["rmserve_error"] == [0.0]
