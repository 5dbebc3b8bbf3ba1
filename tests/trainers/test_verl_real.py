"""verl 0.9.1 itself, not a copy of its code, scoring with rmserve through its reward loop.

verl is installed for real (`pip install torch==<CPU build> verl==0.9.1 ./client`: verl, Ray,
hydra and the rmserve client, never the server) into a virtualenv cached outside the clone
(tests/trainers/venvs.py). tests/trainers/verl_driver.py runs there: it composes verl's
`ppo_trainer` config with hydra and the command-line overrides README.md documents (section
"verl" under "Integrations"), starts a local Ray cluster (2 CPUs, no GPU), builds verl's
RewardLoopManager and scores 2 prompts x 4 rollouts (with verl's `uid`s) two ways: the whole
batch through RewardLoopManager.compute_rm_score, and one sample per call to a reward loop
worker chosen at random, as AgentLoopWorker._compute_score does (see the driver). Only the
policy's generation is stood in for (fixed responses, tokenized by the actor's tokenizer).

The rewards verl ends up with are checked against what rmserve answers for the same items on
POST /v1/score, and the failure paths against the README's reward-integrity promises.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rmserve.client.verl_scoring import EXTRA_INFO_KEYS
from rmserve.service.launcher import ServerProcess
from tests.client.conftest import RecordingProxy
from tests.conftest import start_server
from tests.trainers.venvs import REPO, client_env, trainer_venv

VERL = "0.9.1"
VERSION_ID = f"verl-{VERL}"
DRIVER = Path(__file__).with_name("verl_driver.py")
# torch: the CPU build the project installs (scripts/install.sh), which the local wheels hold;
# unpinned, pip takes the CUDA build from the index (3 GB more of nvidia libraries).
REQUIREMENTS = ["torch==2.13.0", f"verl=={VERL}"]
# The tiny-rm engine is the session `server`'s (tests/conftest.py); the verifier is this one's.
VERIFIERS = "models:\n  math:\n    kind: math\n"
API_KEY = "rms_verl-test-key"
GROUP = 4  # actor_rollout_ref.rollout.n
SYSTEM = "You are a careful assistant. Put the final answer in \\boxed{}."

pytestmark = [
    pytest.mark.engine,
    pytest.mark.parametrize("verl_version", [VERL], ids=[VERSION_ID]),
]


# --- the samples: 2 prompts x 4 rollouts -----------------------------------------------------


def samples(missing_answer: bool = False) -> list[dict[str, Any]]:
    """Right and wrong answers; with `missing_answer`, the second prompt's dataset row has no
    ground truth (the math verifier then reports missing_reference for its 4 rollouts)."""
    out: list[dict[str, Any]] = []
    for p, (a, b) in enumerate([(3, 11), (27, 15)]):
        for s in range(GROUP):
            answer = a + b + (1 if s == 2 else 0)
            response = f"{a} + {b} = {answer}.\n\nThe answer is \\boxed{{{answer}}}."
            if s == 1:
                response = f"We add: {a}+{b}={answer}, so \\boxed{{{answer}}}"
            if s == 3:
                response = f"Adding them gives {answer}. Final: \\boxed{{{answer}}}"
            out.append(
                {
                    "uid": f"uid-{p}-7f3a",
                    "raw_prompt": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"What is {a} + {b}?"},
                    ],
                    "response": response,
                    "ground_truth": None if missing_answer and p == 1 else str(a + b),
                    "data_source": "openai/gsm8k",
                }
            )
    return out


def v1_score(base_url: str, model: str, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """rmserve's own results for the samples' items (the prompt's turns, the response as the
    assistant turn, the ground truth as reference, the uid as group)."""
    items = []
    for sample in batch:
        item: dict[str, Any] = {
            "messages": [
                *sample["raw_prompt"],
                {"role": "assistant", "content": sample["response"]},
            ],
            "group": sample["uid"],
        }
        if sample["ground_truth"] is not None:
            item["reference"] = sample["ground_truth"]
        items.append(item)
    with httpx.Client(base_url=base_url, timeout=300) as client:
        response = client.post("/v1/score", json={"model": model, "items": items})
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


# --- the trainer's environment and the services ----------------------------------------------


@pytest.fixture(scope="module")
def verl_python() -> Path:
    try:
        venv, built_s = trainer_venv(VERSION_ID, REQUIREMENTS)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    print(f"\n{VERSION_ID} venv {venv}: " + (f"built in {built_s:.0f}s" if built_s else "cached"))
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def verifiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("verl-real-verifiers")
    registry = workdir / "registry.yaml"
    registry.write_text(VERIFIERS)
    running = start_server(registry, workdir, {})
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def rm_proxy(server: ServerProcess) -> Iterator[RecordingProxy]:
    """What the reward manager sends the tiny-rm service."""
    with RecordingProxy(server.base_url) as recording:
        yield recording


# --- one run of verl over every case ---------------------------------------------------------


def cases(tiny_lm: Path, rm_url: str, math_url: str) -> list[dict[str, Any]]:
    """The README's overrides, verbatim but for the model names and URLs."""
    base = [
        f"actor_rollout_ref.model.path={tiny_lm}",  # the actor's tokenizer
        f"actor_rollout_ref.rollout.n={GROUP}",
        "reward.num_workers=2",
    ]
    manager = [
        "reward.reward_manager.source=importlib",
        "reward.reward_manager.name=RMServeRewardManager",
        "reward.reward_manager.module.path=pkg://rmserve.client.verl_manager",
    ]
    function = [
        "reward.custom_reward_function.path=pkg://rmserve.client.verl",
        "reward.custom_reward_function.name=compute_score_async",
    ]
    kwargs = "+reward.custom_reward_function.reward_kwargs"
    return [
        {
            "name": "manager",
            "overrides": [
                *base,
                *manager,
                "+reward.reward_kwargs={model: tiny-rm, url: "
                f'"{rm_url}", api_key_env: RMSERVE_API_KEY, on_error: raise}}',
            ],
            "samples": samples(),
        },
        {
            "name": "function",
            "overrides": [*base, *function, f'{kwargs}={{model: math, url: "{math_url}"}}'],
            "samples": samples(),
        },
        # The URL from RMSERVE_URL, which the Ray workers inherit from the driver.
        {
            "name": "flag",
            "overrides": [
                *base,
                *function,
                f"{kwargs}={{model: math, on_error: flag, error_score: -1.0}}",
            ],
            "samples": samples(missing_answer=True),
        },
        {
            "name": "raise",
            "overrides": [*base, *function, f"{kwargs}={{model: math}}"],
            "samples": samples(missing_answer=True),
        },
    ]


@pytest.fixture(scope="module")
def verl_run(
    verl_python: Path,
    verifiers: ServerProcess,
    rm_proxy: RecordingProxy,
    tiny_models: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Every case in one run of the driver (one Ray cluster; each case its own manager)."""
    workdir = tmp_path_factory.mktemp("verl-driver")
    # Ray's sockets live under RAY_TMPDIR, and an AF_UNIX path takes at most 107 bytes: a short
    # directory of its own (not /tmp/ray, where another session may run a cluster).
    ray_tmp = Path(tempfile.mkdtemp(prefix="rv-", dir="/tmp"))
    spec = {
        "verl": VERL,
        "model_path": str(tiny_models["tiny-lm"]),
        "num_cpus": 2,
        "cases": cases(tiny_models["tiny-lm"], rm_proxy.url, verifiers.base_url),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = client_env()
    env.update(
        RMSERVE_URL=verifiers.base_url,
        RMSERVE_API_KEY=API_KEY,
        RAY_TMPDIR=str(ray_tmp),
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
    )
    for name in ("RMSERVE_MODEL", "RMSERVE_ON_ERROR", "RAY_ADDRESS"):
        env.pop(name, None)
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(verl_python), str(DRIVER), str(workdir / "spec.json"), str(workdir / "out.json")],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    (workdir / "driver.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"{done.stdout[-5000:]}\n{done.stderr[-15000:]}"
    report: dict[str, Any] = json.loads((workdir / "out.json").read_text())
    report["driver_s"] = elapsed
    times = ", ".join(f"{n} {c['seconds']:.0f}s" for n, c in report["cases"].items())
    print(
        f"\n{VERSION_ID} (torch {report['torch']}, ray {report['ray']}): driver {elapsed:.0f}s "
        f"(ray.init {report['ray_init_s']:.0f}s; {times})"
    )
    return report


def case(report: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    outcome: dict[str, Any] = report["cases"][name][path]
    assert "error" not in outcome, outcome.get("traceback", outcome)
    return outcome


# --- the tests --------------------------------------------------------------------------------


def test_the_real_verl_ran(verl_version: str, verl_run: dict[str, Any]) -> None:
    assert verl_run["verl"] == verl_version
    # The checkout's client, over the copy installed in the cached venv.
    assert Path(verl_run["client_from"]).is_relative_to(REPO / "client" / "src")
    assert verl_run["cases"]["manager"]["manager_cls"].endswith(".RMServeRewardManager")
    assert verl_run["cases"]["function"]["manager_cls"].endswith(".NaiveRewardManager")


def test_reward_manager_scores_what_rmserve_scores(
    verl_version: str,
    verl_run: dict[str, Any],
    server: ServerProcess,
    rm_proxy: RecordingProxy,
) -> None:
    """RMServeRewardManager, loaded by verl with source=importlib: the rewards verl assembles
    (compute_rm_score's rm_scores, and each per-sample call's reward_score) are tiny-rm's scores
    of the chat verl holds, sent with verl's uid as the group and the README's api_key_env."""
    assert verl_run["verl"] == verl_version
    expected = [r["score"] for r in v1_score(server.base_url, "tiny-rm", samples())]
    batch = case(verl_run, "manager", "batch")
    per_sample = case(verl_run, "manager", "per_sample")
    assert batch["rewards"] == pytest.approx(expected, abs=1e-4)
    assert per_sample["rewards"] == pytest.approx(expected, abs=1e-4)
    assert batch["zero_elsewhere"]  # the reward on the last valid response token only
    assert batch["reward_extra_keys"] == list(EXTRA_INFO_KEYS)
    assert batch["reward_extra_info"]["rmserve_ok"] == [True] * len(expected)
    assert all(info["rmserve_ok"] for info in per_sample["reward_extra_info"])
    assert len(per_sample["workers_used"]) >= 1

    sent = [item for body in rm_proxy.bodies("/v1/score") for item in body["items"]]
    assert len(sent) == 2 * len(expected)  # the batch, then one sample per call
    assert {item["group"] for item in sent} == {"uid-0-7f3a", "uid-1-7f3a"}
    for item in sent:  # rollout.n is 4, val_kwargs.n 1: no group_size (README)
        assert "group_size" not in item
        assert item["messages"][0] == {"role": "system", "content": SYSTEM}
    auth = {r.authorization for r in rm_proxy.recorded if r.path.startswith("/v1/score")}
    assert auth == {f"Bearer {API_KEY}"}


def test_reward_function_scores_what_rmserve_scores(
    verl_version: str, verl_run: dict[str, Any], verifiers: ServerProcess
) -> None:
    """compute_score_async through verl's naive reward manager: the math verifier's scores."""
    assert verl_run["verl"] == verl_version
    expected = [r["score"] for r in v1_score(verifiers.base_url, "math", samples())]
    assert expected == [1.0, 1.0, 0.0, 1.0] * 2
    for path in ("batch", "per_sample"):
        outcome = case(verl_run, "function", path)
        assert outcome["rewards"] == expected, path
    assert case(verl_run, "function", "batch")["zero_elsewhere"]
    infos = case(verl_run, "function", "per_sample")["reward_extra_info"]
    assert [set(info) for info in infos] == [set(EXTRA_INFO_KEYS)] * len(expected)


def test_on_error_flag_gives_the_error_score_flagged(
    verl_version: str, verl_run: dict[str, Any], verifiers: ServerProcess
) -> None:
    """on_error: flag, error_score: -1.0: the rollouts whose row has no answer get -1.0 with
    rmserve_ok False and the error, the others their score."""
    assert verl_run["verl"] == verl_version
    results = v1_score(verifiers.base_url, "math", samples(missing_answer=True))
    assert [r["error"]["type"] for r in results[GROUP:]] == ["missing_reference"] * GROUP
    expected = [r["score"] for r in results[:GROUP]] + [-1.0] * GROUP
    batch = case(verl_run, "flag", "batch")
    per_sample = case(verl_run, "flag", "per_sample")
    assert batch["rewards"] == expected
    assert per_sample["rewards"] == expected
    assert batch["reward_extra_info"]["rmserve_ok"] == [True] * GROUP + [False] * GROUP
    errors = batch["reward_extra_info"]["rmserve_error"]
    assert errors[:GROUP] == [""] * GROUP
    assert all(e.startswith("missing_reference: ") for e in errors[GROUP:]), errors
    assert [info["rmserve_ok"] for info in per_sample["reward_extra_info"]] == [True] * GROUP + [
        False
    ] * GROUP


def test_on_error_raise_reaches_verls_driver_as_item_failed(
    verl_version: str, verl_run: dict[str, Any]
) -> None:
    """The default: a rollout without an answer fails the reward step. What verl's driver gets
    from ray.get (compute_rm_score) and from awaiting the worker (the agent loop) is Ray's
    RayTaskError that is also an ItemFailed, its cause the worker's ItemFailed with its type and
    message (pickled across Ray by its constructor's arguments)."""
    assert verl_run["verl"] == verl_version
    for path in ("batch", "per_sample"):
        outcome = verl_run["cases"]["raise"][path]
        assert "error" in outcome, (path, outcome)
        error, cause = outcome["error"], outcome["cause"]
        assert error["is_item_failed"], (path, error)
        assert "ray.exceptions.RayTaskError" in error["mro"], (path, error)
        assert cause["class"] == "rmserve.client.policy.ItemFailed", (path, cause)
        assert cause["type"] == "missing_reference", (path, cause)
        assert cause["message"], (path, cause)
        assert error["type"] == "missing_reference", (path, error)
        assert "rmserve could not score the item: missing_reference" in error["str"], path


def test_venv_holds_no_rmserve_server(verl_version: str, verl_python: Path) -> None:
    """The trainer's environment has the client distribution only."""
    listed = subprocess.run(
        [str(verl_python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert listed.returncode == 0, listed.stderr
    names = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    assert names["verl"] == verl_version
    assert "rmserve-client" in names
    assert "rmserve" not in names
    assert names["torch"].endswith("+cpu")
