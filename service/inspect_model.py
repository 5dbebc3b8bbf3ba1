"""`rmserve inspect-model`: what rmserve and vLLM make of a model, before it goes in a registry.

For a local model directory (or a hub id, where the hub is reachable) it reports the kind rmserve
would serve it as and why, the head output that becomes the score, whether custom code is needed,
what vLLM resolves (architecture, runner, pooling; from its own `ModelConfig`, no weights
loaded), a sample conversation as the model's chat template renders it, and, for pooling kinds,
the sample scored by the vLLM CPU engine next to a float32 transformers reference on the same
tokens.

Exit status: 0 ready to serve; 1 the comparison disagrees (or the engine could not score);
2 rmserve cannot serve the model as it is (the reasons are in `problems`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TextIO

from rmserve.models.errors import ModelLoadError
from rmserve.wire.errors import ItemError

Kind = Literal["discriminative", "process", "generative"]

TOLERANCE = 1e-4
# The engine started for the comparison: float32 like the reference, small and quick to start.
COMPARE_MAX_MODEL_LEN = 512
COMPARE_KV_CACHE_GIB = 0.25

SAMPLE_QUESTION = "A pen costs 3 dollars. How much do 4 pens and a 5-dollar notebook cost?"
SAMPLE_STEPS = ("4 pens cost 4 * 3 = 12 dollars.", "12 + 5 = 17, so they cost 17 dollars.")
STEP_SEPARATOR = "\n\n"
# Step tags of well-known PRMs (Qwen2.5-Math-PRM, rmserve's tiny-prm, Math-Shepherd), tried in
# this order when --step-tag is not given.
KNOWN_STEP_TAGS = ("<extra_0>", "<step>", "ки")

_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# -- the report --------------------------------------------------------------------------------


@dataclass
class ConfigInfo:
    architectures: list[str]
    model_type: str | None
    num_labels: int
    id2label: dict[str, str]
    dtype: str | None
    vision: bool


@dataclass
class KindInfo:
    kind: Kind
    source: Literal["detected", "--kind"]
    reason: str


@dataclass
class HeadInfo:
    """Which head output becomes the reward, and how."""

    num_labels: int
    label: int | None
    label_name: str | None
    activation: str
    description: str


@dataclass
class RemoteCodeInfo:
    needed: bool
    auto_map: dict[str, Any]
    trusted: bool
    can_run: bool
    # Nothing can be served without it (the config itself is custom code, or trusted code is
    # missing).
    blocking: bool
    reason: str


@dataclass
class VllmInfo:
    version: str
    resolved_architecture: str | None = None
    implementation: str | None = None
    runner: str | None = None
    convert: str | None = None
    pooling_tasks: list[str] | None = None
    pooling_tasks_source: str | None = None
    seq_pooling_type: str | None = None
    tok_pooling_type: str | None = None
    dtype_auto: str | None = None
    max_model_len: int | None = None
    multimodal: bool | None = None
    error: str | None = None


@dataclass
class PromptInfo:
    messages: list[dict[str, str]]
    has_chat_template: bool
    text: str | None = None
    token_ids: list[int] | None = None
    num_tokens: int | None = None
    step_tag: str | None = None
    step_tag_id: int | None = None
    step_positions: list[int] | None = None
    bos: str | None = None
    eos: str | None = None
    scored_token: str | None = None
    note: str | None = None


@dataclass
class ComparisonInfo:
    ran: bool
    reason: str | None = None
    task: str | None = None
    engine: list[list[float]] | None = None
    engine_prefix: list[list[float]] | None = None
    reference: list[list[float]] | None = None
    reference_class: str | None = None
    reference_reason: str | None = None
    engine_scores: list[float] | None = None
    reference_scores: list[float] | None = None
    max_abs_diff: float | None = None
    tolerance: float = TOLERANCE
    verdict: str | None = None
    explanation: str | None = None


@dataclass
class Report:
    model: str
    path: str | None = None
    source: str | None = None
    config: ConfigInfo | None = None
    kind: KindInfo | None = None
    head: HeadInfo | None = None
    remote_code: RemoteCodeInfo | None = None
    vllm: VllmInfo | None = None
    prompt: PromptInfo | None = None
    comparison: ComparisonInfo | None = None
    registry_entry: dict[str, Any] | None = None
    # Why rmserve cannot serve the model as it is (exit 2).
    problems: list[str] = field(default_factory=list)
    # The comparison disagreed or could not run on the engine (exit 1).
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 2 if self.problems else 1 if self.failures else 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code, "ok": self.exit_code == 0}


class _Stop(Exception):
    """A problem after which nothing else can be inspected (already in the report)."""


# -- inspection --------------------------------------------------------------------------------


def inspect_model(
    location: str,
    *,
    kind: Kind | None = None,
    compare: bool | None = None,
    trust_remote_code: bool = False,
    step_tag: str | None = None,
) -> Report:
    """Inspect `location` (a model directory or a hub id). Never raises for a model problem:
    every reason is in the report (`problems`, `failures`, `warnings`)."""
    report = Report(model=location)
    with contextlib.suppress(_Stop):
        _inspect(report, location, kind, compare, trust_remote_code, step_tag)
    return report


def _inspect(
    report: Report,
    location: str,
    kind: Kind | None,
    compare: bool | None,
    trust: bool,
    step_tag: str | None,
) -> None:
    path = _locate(report, location, trust)
    raw = _read_config(report, path)
    config = report.config = _config_info(report, path, raw, trust)
    report.kind = _kind(report, config, kind)
    report.head = _head(report.kind.kind, config)
    vllm_info = _resolve_vllm(report, path, report.kind.kind, trust)
    tokenizer = _tokenizer(report, path, trust)
    if tokenizer is not None:
        report.prompt = _prompt(report, tokenizer, report.kind.kind, step_tag)
    report.registry_entry = _registry_entry(report, location, path, vllm_info, trust)
    pooling = report.kind.kind != "generative"
    if compare is None:
        compare = pooling
    if not compare:
        return
    if not pooling:
        report.comparison = ComparisonInfo(
            ran=False,
            reason="only pooling models (discriminative, process) are compared: a generative "
            "judge's output is sampled text",
        )
        return
    if report.problems or report.prompt is None or report.prompt.token_ids is None:
        report.comparison = ComparisonInfo(
            ran=False, reason="not run: the problems above come first"
        )
        return
    report.comparison = _compare(report, path, report.kind.kind, report.prompt, trust)


def _locate(report: Report, location: str, trust: bool) -> Path:
    path = Path(location).expanduser()
    if path.exists():
        path = path.resolve()
        report.path, report.source = str(path), "local directory"
        if not path.is_dir():
            _stop(report, f"{location} is a file, not a model directory")
        if not (path / "config.json").is_file():
            _stop(report, f"{location} has no config.json: it is not a model directory")
        return path
    looks_local = location.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(location)
    if looks_local:
        _stop(report, f"no such model directory: {location}")
    from rmserve.models.weights import resolve_weights

    try:
        path = resolve_weights(location, None, allow_remote_code=trust)
    except ModelLoadError as exc:
        _stop(report, f"{location} is not a local directory, and as a hub id: {exc}")
    report.path, report.source = str(path), "hub (local cache)"
    return path


def _read_config(report: Report, path: Path) -> dict[str, Any]:
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        _stop(report, f"config.json is not valid JSON: {exc}")
    except (OSError, UnicodeDecodeError) as exc:
        _stop(report, f"cannot read config.json: {exc}")
    if not isinstance(raw, dict):
        _stop(report, "config.json does not hold a JSON object")
    architectures = raw.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        _stop(report, "config.json names no `architectures`, so the model class is unknown")
    return raw


def _config_info(report: Report, path: Path, raw: dict[str, Any], trust: bool) -> ConfigInfo:
    """The config as transformers reads it, and whether custom code is needed (auto_map)."""
    id2label = raw.get("id2label") if isinstance(raw.get("id2label"), dict) else {}
    dtype = raw.get("dtype", raw.get("torch_dtype"))
    info = report.config = ConfigInfo(
        architectures=[str(a) for a in raw["architectures"]],
        model_type=str(raw["model_type"]) if raw.get("model_type") is not None else None,
        num_labels=int(raw.get("num_labels") or len(id2label or {}) or 1),
        id2label={str(k): str(v) for k, v in (id2label or {}).items()},
        dtype=str(dtype) if dtype is not None else None,
        vision=raw.get("vision_config") is not None,
    )
    report.remote_code = _remote_code(path, raw, trust)
    if report.remote_code.blocking:
        _stop(report, report.remote_code.reason)
    if report.remote_code.needed and not report.remote_code.can_run:
        report.warnings.append(report.remote_code.reason)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    except Exception as exc:
        _stop(report, f"transformers cannot read config.json: {_first_line(exc)}")
    # As transformers completes it (num_labels defaults to 2 without id2label, for instance).
    labels = getattr(config, "id2label", None) or {}
    info.id2label = {str(k): str(v) for k, v in labels.items()}
    info.num_labels = int(getattr(config, "num_labels", info.num_labels) or 1)
    info.vision = getattr(config, "vision_config", None) is not None
    return info


def _remote_code(path: Path, raw: dict[str, Any], trust: bool) -> RemoteCodeInfo:
    """Custom code is needed when config.json has an `auto_map` and transformers lacks the
    model type or the architecture (with both known, transformers uses its own classes).

    Without the model type nothing can read the config: the model cannot be served untrusted.
    Without the architecture only transformers needs the code (for the reference): vLLM runs
    its own implementation of the architecture, if it has one, and never the model's code."""
    import transformers
    from transformers import CONFIG_MAPPING

    auto_map = raw.get("auto_map") or {}
    if not isinstance(auto_map, dict) or not auto_map:
        return RemoteCodeInfo(False, {}, trust, True, False, "not needed: no auto_map in config")
    model_type = raw.get("model_type")
    known_type = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    unknown_archs = [a for a in raw.get("architectures") or [] if not hasattr(transformers, a)]
    if known_type and not unknown_archs:
        return RemoteCodeInfo(
            False, auto_map, trust, True, False,
            f"not needed: transformers has {model_type!r} and its classes (auto_map is unused)",
        )  # fmt: skip
    references = [v for value in auto_map.values() for v in _as_list(value) if v]
    modules = sorted({ref.split("--")[-1].rsplit(".", 1)[0] for ref in references})
    elsewhere = sorted({ref.split("--")[0] for ref in references if "--" in ref})
    missing = [m for m in modules if not (path / f"{m.replace('.', '/')}.py").is_file()]
    files = ", ".join(f"{m}.py" for m in modules) or "its modules"
    if trust and elsewhere:
        return RemoteCodeInfo(
            True, auto_map, trust, False, True,
            f"auto_map takes the model's code from another hub repository "
            f"({', '.join(elsewhere)}), not available here: copy its modules into the model "
            "directory",
        )  # fmt: skip
    if trust and missing:
        return RemoteCodeInfo(
            True, auto_map, trust, False, True,
            f"auto_map names {', '.join(f'{m}.py' for m in missing)}, missing from the model "
            "directory",
        )  # fmt: skip
    if trust:
        return RemoteCodeInfo(True, auto_map, trust, True, False, f"trusted ({files})")
    if not known_type:
        return RemoteCodeInfo(
            True, auto_map, trust, False, True,
            f"transformers does not know model type {model_type!r}: the model defines it in "
            f"its own code ({files}, named by config.json's auto_map), which rmserve runs only "
            "when trusted: read it, then pass --trust-remote-code here and set "
            "`engine: {trust_remote_code: true}` in the registry",
        )  # fmt: skip
    return RemoteCodeInfo(
        True, auto_map, trust, False, False,
        f"the architecture {unknown_archs[0]} is the model's own code ({files}): vLLM serves it "
        "only with an implementation of its own (see below), and the transformers reference "
        "needs the code (--trust-remote-code)",
    )  # fmt: skip


def _kind(report: Report, config: ConfigInfo, asked: Kind | None) -> KindInfo:
    arch = config.architectures[0]
    detected = _detect_kind(arch, config)
    if len(config.architectures) > 1:
        report.warnings.append(
            f"config.json names {len(config.architectures)} architectures; the first, {arch}, "
            "is the one loaded"
        )
    if asked is not None:
        if detected is not None and detected[0] != asked:
            report.warnings.append(
                f"{arch} looks like a {detected[0]} model ({detected[1]}), but is inspected as "
                f"{asked} as asked"
            )
        return KindInfo(asked, "--kind", f"as asked (--kind {asked})")
    if detected is None:
        _stop(
            report,
            f"{arch} is not an architecture rmserve serves: reward models are "
            "*ForSequenceClassification or *ForRewardModel (discriminative), "
            "*ForTokenClassification or *ForProcessRewardModel (process), and judges are "
            "*ForCausalLM or vision-language *ForConditionalGeneration (generative); "
            "--kind names the kind of a model whose class is named otherwise",
        )
    kind, reason = detected
    if kind == "discriminative" and config.num_labels != 1:
        report.warnings.append(
            f"the head has {config.num_labels} labels, where a reward model has one: rmserve "
            "scores label options.score_label (default 0) and returns all of them in `scores`; "
            "check on the model card which one is the reward"
        )
    return KindInfo(kind, "detected", reason)


def _detect_kind(arch: str, config: ConfigInfo) -> tuple[Kind, str] | None:
    labels = f"{config.num_labels} label{'s' if config.num_labels != 1 else ''}"
    if arch.endswith("ForProcessRewardModel"):
        return "process", "a *ForProcessRewardModel: a head output per token, read at each step tag"
    if arch.endswith("ForTokenClassification"):
        return "process", (
            f"a *ForTokenClassification head ({labels}): an output per token, read at each "
            "step tag (a process reward model)"
        )
    if arch.endswith(("ForRewardModel", "ForRewardModeling")):
        return "discriminative", "a *ForRewardModel: one reward per conversation"
    if arch.endswith("ForSequenceClassification"):
        return "discriminative", (
            f"a *ForSequenceClassification head ({labels}): one output per conversation, read "
            "at its last token (a Bradley-Terry reward model)"
        )
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "generative", (
            "a causal language model without a reward head: served as an LLM judge whose "
            "verdicts are parsed from the text it writes"
        )
    if arch.endswith("ForConditionalGeneration") and config.vision:
        return "generative", (
            "a vision-language model (its config has a vision tower): served as an LLM judge "
            "that also reads the items' images"
        )
    return None


def _head(kind: Kind, config: ConfigInfo) -> HeadInfo:
    n, names = config.num_labels, config.id2label
    if kind == "generative":
        return HeadInfo(n, None, None, "none", "no reward head: the judge's text is parsed")
    if kind == "discriminative":
        label = 0
        return HeadInfo(
            n, label, names.get(str(label)), "none",
            f"head output {label} ({names.get(str(label), 'unnamed')}), the raw logit (no "
            "activation), is `score`" + ("; all outputs are in `scores`" if n > 1 else ""),
        )  # fmt: skip
    if n == 1:
        return HeadInfo(
            n, 0, names.get("0"), "sigmoid",
            "sigmoid of the single head output at each step tag is the step's score",
        )  # fmt: skip
    label = _positive_label(names, n)
    return HeadInfo(
        n, label, names.get(str(label)), "softmax",
        f"softmax over the {n} outputs at each step tag, probability of label {label} "
        f"({names.get(str(label), 'unnamed')}), is the step's score",
    )  # fmt: skip


def _positive_label(id2label: dict[str, str], n: int) -> int:
    """The label meaning a correct step: named so, else 1 (Qwen2.5-Math-PRM's convention)."""
    for index, name in sorted(id2label.items()):
        if name.strip().lower() in ("positive", "good", "correct", "true", "yes", "+", "1"):
            return int(index)
    return 1 if n > 1 else 0


def _resolve_vllm(report: Report, path: Path, kind: Kind, trust: bool) -> VllmInfo:
    """vLLM's own resolution of the model: the ModelConfig of the engine arguments rmserve
    starts it with (config only, no weights loaded)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm

    from rmserve.models.engine import engine_args
    from rmserve.models.spec import EngineOptions

    info = VllmInfo(version=vllm.__version__)
    report.vllm = info
    runner: Literal["generate", "pooling"] = "generate" if kind == "generative" else "pooling"
    try:
        args = engine_args(path, path, EngineOptions(trust_remote_code=trust), runner)
        args.max_model_len = None  # the model's own context length, not the registry default
        config = args.create_model_config()
    except Exception as exc:
        info.error = _vllm_error(exc, report.config.architectures[0] if report.config else "")
        report.problems.append(f"vLLM {info.version} cannot serve it: {info.error}")
        return info
    info.resolved_architecture = str(config.architecture)
    info.runner, info.convert = str(config.runner_type), str(config.convert_type)
    # The class vLLM builds: its own implementation, or the base model it converts.
    model_info = getattr(config, "_model_info", None)
    info.implementation = str(getattr(model_info, "architecture", "")) or None
    info.dtype_auto = str(config.dtype).removeprefix("torch.")
    info.max_model_len = int(config.max_model_len)
    info.multimodal = bool(config.is_multimodal_model)
    pooler = config.pooler_config
    if pooler is not None:
        info.seq_pooling_type = pooler.seq_pooling_type
        info.tok_pooling_type = pooler.tok_pooling_type
    # The adapters' poolers (vllm/model_executor/models/adapters.py): as_seq_cls_model serves
    # classify and token_classify with the same head, as_embedding_model embed and token_embed.
    # A model with its own pooler says which tasks it serves once it is built (the engine).
    predicted = {"classify": ["classify", "token_classify"], "embed": ["embed", "token_embed"]}
    if info.runner == "pooling" and info.convert in predicted:
        info.pooling_tasks = predicted[info.convert]
        info.pooling_tasks_source = f"vLLM's --convert {info.convert} adapter"
    if kind != "generative" and info.runner == "pooling" and info.convert == "embed":
        report.problems.append(
            f"vLLM would serve {info.resolved_architecture} as an embedding model (--convert "
            "embed): it has no reward head for rmserve to read"
        )
    return info


def _tokenizer(report: Report, path: Path, trust: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except Exception as exc:
        report.problems.append(f"cannot load the tokenizer: {_first_line(exc)}")
        return None


def _prompt(report: Report, tokenizer: Any, kind: Kind, step_tag: str | None) -> PromptInfo:
    from rmserve.models.process import step_tag_id
    from rmserve.models.rendering import ChatRenderer

    answer = STEP_SEPARATOR.join(SAMPLE_STEPS)
    tag: str | None = None
    if kind == "process":
        tag = step_tag or _find_step_tag(tokenizer)
        if tag is None:
            report.problems.append(
                "the tokenizer has none of the usual step tags ("
                + ", ".join(KNOWN_STEP_TAGS)
                + "): pass --step-tag TAG, the token the PRM scores at the end of each step "
                "(see its model card)"
            )
        else:
            # As rmserve's `steps: separator` does: each step of the answer ends with the tag.
            answer = tag.join(SAMPLE_STEPS) + tag
    messages = [
        {"role": "user", "content": SAMPLE_QUESTION},
        {"role": "assistant", "content": answer},
    ]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    info = PromptInfo(messages=messages, has_chat_template=has_template, step_tag=tag)
    info.bos, info.eos = tokenizer.bos_token, tokenizer.eos_token
    if not has_template:
        info.note = (
            "the tokenizer has no chat template: rmserve refuses to serve the model, since it "
            "cannot render conversations the way the model was trained"
        )
        report.problems.append(
            "the tokenizer has no chat template; add the model's template (chat_template in "
            "tokenizer_config.json, or chat_template.jinja), or point the registry entry's "
            "`tokenizer:` at a tokenizer that has it"
        )
        return info
    try:
        renderer = ChatRenderer(tokenizer, COMPARE_MAX_MODEL_LEN, "error")
        info.text = renderer.render([dict(m) for m in messages])
        ids = renderer.encode(info.text)
    except Exception as exc:  # a template error (ItemError) or a tokenizer failure
        report.problems.append(f"the chat template cannot render the sample: {_message(exc)}")
        return info
    info.token_ids, info.num_tokens = ids, len(ids)
    info.note = _special_tokens_note(report, tokenizer, ids)
    if ids:
        info.scored_token = repr(tokenizer.decode(ids[-1:]))
    if kind == "process" and tag is not None:
        try:
            info.step_tag_id = step_tag_id(tokenizer, tag)
        except ModelLoadError as exc:
            report.problems.append(str(exc))
            return info
        info.step_positions = [i for i, t in enumerate(ids) if t == info.step_tag_id]
        if len(info.step_positions) != len(SAMPLE_STEPS):
            report.problems.append(
                f"the rendered sample has {len(info.step_positions)} step tags for "
                f"{len(SAMPLE_STEPS)} steps: the chat template adds or drops {tag!r}"
            )
    return info


def _find_step_tag(tokenizer: Any) -> str | None:
    vocab = tokenizer.get_vocab()
    for tag in KNOWN_STEP_TAGS:
        if tag in vocab and len(tokenizer.encode(tag, add_special_tokens=False)) == 1:
            return tag
    return None


def _special_tokens_note(report: Report, tokenizer: Any, ids: list[int]) -> str:
    """BOS/EOS: what the template writes, what the tokenizer would add, what rmserve does."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    added = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    adds_bos = bos_id is not None and added[:1] == [bos_id] and plain[:1] != [bos_id]
    adds_eos = eos_id is not None and added[-1:] == [eos_id] and plain[-1:] != [eos_id]
    parts = []
    if bos_id is None:
        parts.append("the tokenizer has no BOS token")
    elif ids[:2] == [bos_id, bos_id]:
        parts.append("the template writes BOS twice")
        report.warnings.append("the rendered sample starts with two BOS tokens")
    elif ids[:1] == [bos_id]:
        parts.append(
            "the template writes BOS" + (", and rmserve adds no second one" if adds_bos else "")
        )
    else:
        parts.append(
            "no BOS: the template writes none"
            + (" (the tokenizer would add one by default)" if adds_bos else "")
        )
        if adds_bos:
            report.warnings.append(
                "the chat template writes no BOS though the tokenizer adds one by default: if "
                "the model was trained with BOS, its template is incomplete"
            )
    parts.append(
        "rmserve tokenizes the rendered text without adding special tokens"
        + (" (the tokenizer's default would add " if adds_bos or adds_eos else "")
        + ("BOS" if adds_bos else "")
        + (" and " if adds_bos and adds_eos else "")
        + ("EOS" if adds_eos else "")
        + (")" if adds_bos or adds_eos else "")
    )
    if eos_id is not None:
        parts.append(
            "the text ends with EOS"
            if ids[-1:] == [eos_id]
            else ("EOS occurs in the text" if eos_id in ids else "no EOS in the text")
        )
    return "; ".join(parts)


def _registry_entry(
    report: Report, location: str, path: Path, info: VllmInfo | None, trust: bool
) -> dict[str, Any] | None:
    """A registry entry for the model (validated by rmserve's registry schema)."""
    from pydantic import TypeAdapter, ValidationError

    from rmserve.models.spec import ModelSpec

    if report.kind is None or report.head is None:
        return None
    kind = report.kind.kind
    name = _NAME.sub("-", Path(location.rstrip("/")).name).strip("-._") or "my-model"
    weights = str(path) if report.source == "local directory" else location
    engine: dict[str, Any] = {}
    if info is not None and info.max_model_len is not None:
        engine["max_model_len"] = min(info.max_model_len, 8192)
    if trust and report.remote_code is not None and report.remote_code.needed:
        engine["trust_remote_code"] = True
    entry: dict[str, Any] = {"kind": kind, "weights": weights}
    if engine:
        entry["engine"] = engine
    if kind == "discriminative":
        entry["options"] = {"score_label": report.head.label or 0}
    elif kind == "process":
        tag = report.prompt.step_tag if report.prompt is not None else None
        entry["options"] = {
            "steps": "separator",
            "separator": STEP_SEPARATOR,
            "step_tag": tag or "TODO: the model's step tag",
            "activation": report.head.activation,
            "positive_label": report.head.label or 0,
        }
    try:
        TypeAdapter(ModelSpec).validate_python({"name": name, **entry})
    except ValidationError as exc:  # a bug here, not the user's: still show the entry
        report.warnings.append(f"the suggested registry entry does not validate: {exc}")
    return {"models": {name: entry}}


# -- the comparison ----------------------------------------------------------------------------


def _compare(
    report: Report, path: Path, kind: Kind, prompt: PromptInfo, trust: bool
) -> ComparisonInfo:
    assert prompt.token_ids is not None
    ids = prompt.token_ids
    positions = prompt.step_positions if kind == "process" else None
    result = ComparisonInfo(
        ran=True, task="classify" if kind == "discriminative" else "token_classify"
    )
    # The reference first, released before the engine starts: both would not fit beside a
    # large model.
    try:
        declared = report.config.architectures[0] if report.config is not None else ""
        result.reference, result.reference_class = _reference(
            path, kind, declared, ids, positions, trust
        )
    except _NoReference as exc:
        result.reference_reason = str(exc)
    gc.collect()
    try:
        engine_run = _engine_rows(path, kind, ids, positions, trust)
    except ItemError as exc:  # the engine serves the model, not what rmserve asks of it
        result.ran = False
        result.reason = f"vLLM cannot give rmserve the {kind} head outputs: {exc.message}"
        report.problems.append(result.reason)
        return result
    except ModelLoadError as exc:
        result.ran = False
        result.reason = str(exc)
        report.failures.append(f"the vLLM engine could not score the sample: {exc}")
        return result
    finally:
        gc.collect()  # the engine client, shut down, while its modules are still there
    if report.vllm is not None:
        report.vllm.pooling_tasks = engine_run.tasks
        report.vllm.pooling_tasks_source = "the engine"
        report.vllm.seq_pooling_type = engine_run.seq_pooling_type
        report.vllm.tok_pooling_type = engine_run.tok_pooling_type
    result.engine, result.engine_prefix = engine_run.rows, engine_run.prefix_rows
    head = report.head
    assert head is not None
    result.engine_scores = [_score(row, head) for row in result.engine]
    if result.reference is None:
        result.verdict = "no reference"
        result.explanation = (
            f"vLLM scored the sample, but there is no transformers reference: "
            f"{result.reference_reason}"
        )
        report.warnings.append(f"not compared with transformers: {result.reference_reason}")
        return result
    result.reference_scores = [_score(row, head) for row in result.reference]
    diffs = [
        abs(a - b)
        for rows in (result.engine, result.engine_prefix)
        if rows is not None
        for got, want in zip(rows, result.reference, strict=True)
        for a, b in zip(got, want, strict=True)
    ]
    result.max_abs_diff = max(diffs, default=0.0)
    if result.max_abs_diff <= TOLERANCE:
        result.verdict = "agree"
        result.explanation = (
            f"vLLM and transformers agree within {TOLERANCE:g} on the raw head outputs: vLLM "
            "runs the model as transformers does"
        )
    else:
        result.verdict = "disagree"
        result.explanation = _disagreement(report, result.max_abs_diff)
        report.failures.append(
            f"vLLM and transformers disagree by {result.max_abs_diff:.3g} (> {TOLERANCE:g}): "
            + result.explanation
        )
    return result


def _disagreement(report: Report, diff: float) -> str:
    if diff < 1e-2:
        return (
            "a small difference: numerics (other kernels or reduction order) rather than a "
            "different computation; worth a look with longer inputs before serving"
        )
    causes = []
    remote = report.remote_code
    if remote is not None and remote.auto_map:
        causes.append(
            "vLLM runs its own implementation of the architecture, not the checkpoint's custom "
            "code (auto_map), and they differ"
        )
    vllm_info = report.vllm
    discriminative = report.kind is not None and report.kind.kind == "discriminative"
    if discriminative and vllm_info is not None and vllm_info.seq_pooling_type != "LAST":
        causes.append(
            f"vLLM pools {vllm_info.seq_pooling_type} where transformers reads the last token"
        )
    causes.append(
        "the head or its pooling differs in vLLM (a bias, a normalisation or a projection its "
        "adapter does not load), or weights were not loaded under the names vLLM expects"
    )
    return "a different computation, not numerics: " + "; or ".join(causes)


def _score(row: Sequence[float], head: HeadInfo) -> float:
    label = head.label or 0
    if head.activation == "sigmoid":
        return 1.0 / (1.0 + math.exp(-row[label]))
    if head.activation == "softmax":
        top = max(row)
        return math.exp(row[label] - top) / math.fsum(math.exp(x - top) for x in row)
    return float(row[label])


class _NoReference(Exception):
    """transformers cannot build the model's own head: the reason."""


def _reference(
    path: Path,
    kind: Kind,
    declared: str,
    ids: list[int],
    positions: list[int] | None,
    trust: bool,
) -> tuple[list[list[float]], str]:
    """The raw head outputs by transformers in float32: the sequence's, or each step tag's;
    _NoReference unless transformers builds the declared architecture with all its weights."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = AutoModelForSequenceClassification if kind == "discriminative" else (
        AutoModelForTokenClassification
    )  # fmt: skip
    try:
        model, loading = auto.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust, output_loading_info=True
        )
    except Exception as exc:
        raise _NoReference(
            f"transformers cannot build it with {auto.__name__}: {_first_line(exc)}"
        ) from None
    built = type(model).__name__
    missing = sorted(loading.get("missing_keys") or [])
    try:
        if built != declared:
            raise _NoReference(
                f"{auto.__name__} builds {built} for this config, not the model's {declared}"
            )
        if missing:
            raise _NoReference(
                f"{auto.__name__} builds {built}, and the checkpoint has no weights for "
                f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: transformers "
                "would initialise them randomly, so it is not the model's own head"
            )
        with torch.no_grad():
            logits = model.eval()(torch.tensor([ids])).logits[0]
    finally:
        del model
    if kind == "discriminative":
        return [[float(x) for x in logits]], built
    assert positions is not None
    return [[float(x) for x in logits[p]] for p in positions], built


@dataclass
class _EngineRun:
    rows: list[list[float]]
    prefix_rows: list[list[float]] | None
    tasks: list[str]
    seq_pooling_type: str | None
    tok_pooling_type: str | None


def _engine_rows(
    path: Path, kind: Kind, ids: list[int], positions: list[int] | None, trust: bool
) -> _EngineRun:
    """The raw head outputs by the vLLM CPU engine (float32), as rmserve asks for them: the
    `classify` row of a discriminative model; a process model's `token_classify` rows at its
    step tags and, when the engine serves it, each step's `classify` row of its prefix (the
    `reuse_prefix` path)."""
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    from rmserve.models.engine import VllmPoolingEngine, engine_args
    from rmserve.models.spec import EngineOptions

    options = EngineOptions(
        max_model_len=COMPARE_MAX_MODEL_LEN,
        dtype="float32",
        kv_cache_gib=COMPARE_KV_CACHE_GIB,
        enforce_eager=True,
        max_num_seqs=8,
        trust_remote_code=trust,
    )

    async def session() -> _EngineRun:
        # Started, used and shut down on one event loop, which asyncio.run then drains (vLLM
        # closes its sockets and stops its output handler on it).
        try:
            llm = AsyncLLM.from_engine_args(
                engine_args(path, path, options), usage_context=UsageContext.OPENAI_API_SERVER
            )
        except Exception as exc:
            raise ModelLoadError(f"the vLLM engine failed to start: {_root_cause(exc)}") from exc
        try:
            return await _pool(VllmPoolingEngine(llm, llm.model_config.max_model_len), llm)
        finally:
            llm.shutdown()
            await asyncio.sleep(0)

    async def _pool(engine: VllmPoolingEngine, llm: Any) -> _EngineRun:
        pooler = llm.model_config.pooler_config
        tasks = sorted(str(task) for task in await llm.get_supported_tasks())
        seq = pooler.seq_pooling_type if pooler is not None else None
        tok = pooler.tok_pooling_type if pooler is not None else None
        run = _EngineRun([], None, tasks, seq, tok)
        # As rmserve's models ask: the errors they would give items come as ItemError.
        if kind == "discriminative":
            run.rows = await engine.pool(ids, "classify")
            if len(run.rows) != 1:
                raise ItemError("unsupported_model", f"`classify` gave {len(run.rows)} rows")
            return run
        assert positions is not None
        rows = await engine.pool(ids, "token_classify")
        if len(rows) != len(ids):
            raise ItemError(
                "unsupported_model",
                f"`token_classify` gave {len(rows)} rows for {len(ids)} tokens (token pooling "
                f"{tok}): rmserve reads one row per token",
            )
        run.rows = [rows[p] for p in positions]
        if await engine.supports("classify"):
            run.prefix_rows = [(await engine.pool(ids[: p + 1], "classify"))[0] for p in positions]
        return run

    try:
        return asyncio.run(session())
    except (ModelLoadError, ItemError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"the vLLM engine failed to score: {_root_cause(exc)}") from exc


# -- helpers -----------------------------------------------------------------------------------


def _stop(report: Report, problem: str) -> NoReturn:
    report.problems.append(problem)
    raise _Stop


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    return str(message) if message else _first_line(exc)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _vllm_error(exc: BaseException, architecture: str) -> str:
    errors = getattr(exc, "errors", None)  # pydantic's ValidationError of ModelConfig
    if callable(errors):
        text = "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in errors())
    else:
        text = str(exc).strip()
    if "are not supported for now" in text:  # followed by every architecture vLLM has
        base = re.sub(
            r"For(Sequence|Token)Classification$|ForRewardModel$", "ForCausalLM", architecture
        )
        also = f", nor of {base}, which it would convert" if base != architecture else ""
        return f"it has no implementation of {architecture}{also}"
    return text.splitlines()[0] if text else type(exc).__name__


# -- output ------------------------------------------------------------------------------------


def format_text(report: Report) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"model          {report.model}" + (f" ({report.source})" if report.source else ""))
    if report.path and report.path != report.model:
        add(f"path           {report.path}")
    if report.config is not None:
        c = report.config
        labels = ", ".join(f"{k}={v}" for k, v in sorted(c.id2label.items())) or "none named"
        add(f"architecture   {', '.join(c.architectures)} (model_type {c.model_type})")
        if report.kind is None or report.kind.kind != "generative":
            add(f"labels         num_labels {c.num_labels} ({labels})")
    if report.kind is not None:
        add(f"kind           {report.kind.kind} ({report.kind.source}): {report.kind.reason}")
    if report.head is not None:
        add(f"score          {report.head.description}")
    if report.remote_code is not None:
        add(f"remote code    {report.remote_code.reason}")
    if report.vllm is not None:
        v = report.vllm
        add(f"vLLM {v.version} (the ModelConfig of rmserve's engine arguments: no weights loaded)")
        if v.error:
            add(f"  error        {v.error}")
        else:
            built = f"vLLM's {v.implementation}" if v.implementation else "vLLM's class"
            if v.convert not in (None, "none"):
                built += f", converted (--convert {v.convert})"
            add(f"  architecture {v.resolved_architecture}: {built}")
            add(f"  runner       {v.runner}")
            if v.runner == "pooling":
                tasks = ", ".join(v.pooling_tasks or []) or "known once the engine starts"
                source = f" (from {v.pooling_tasks_source})" if v.pooling_tasks_source else ""
                add(f"  tasks        {tasks}{source}")
                add(f"  pooling      sequence {v.seq_pooling_type}, per token {v.tok_pooling_type}")
                if report.kind is not None:
                    add(f"  rmserve asks {_rmserve_tasks(report.kind.kind, v)}")
            if v.multimodal:
                add("  multimodal   yes (images are passed to the engine)")
            add(f"  dtype        {_dtype_note(v.dtype_auto, report.config)}")
            add(f"  context      max_model_len {v.max_model_len} (from the config)")
    if report.prompt is not None:
        p = report.prompt
        add("sample         " + " | ".join(f"{m['role']}: {m['content']!r}" for m in p.messages))
        add(f"chat template  {'yes' if p.has_chat_template else 'none'}")
        if p.text is not None:
            add(f"prompt         {p.num_tokens} tokens, rendered by the chat template:")
            lines.extend(f"  | {line}" for line in p.text.split("\n"))
        if p.step_tag is not None:
            add(f"step tag       {p.step_tag!r} (id {p.step_tag_id}) at tokens {p.step_positions}")
        add(f"BOS/EOS        BOS {p.bos!r}, EOS {p.eos!r}" + (f": {p.note}" if p.note else ""))
        if p.scored_token is not None and report.kind and report.kind.kind == "discriminative":
            add(f"scored token   the last one, {p.scored_token}")
    if report.comparison is not None:
        lines.extend(_format_comparison(report.comparison))
    if report.registry_entry is not None:
        import yaml

        class Dumper(yaml.SafeDumper):
            pass

        def string(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
            style = '"' if "\n" in value else None  # a separator "\n\n" on one line
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

        Dumper.add_representer(str, string)
        add("registry entry (to adapt):")
        text = yaml.dump(report.registry_entry, Dumper=Dumper, sort_keys=False, width=100)
        lines.extend(f"  {line}" for line in text.rstrip().split("\n"))
    lines.extend(f"warning: {w}" for w in report.warnings)
    lines.extend(f"error: {p}" for p in report.problems)
    lines.extend(f"failed: {f}" for f in report.failures)
    add(_verdict(report))
    return "\n".join(lines) + "\n"


def _rmserve_tasks(kind: Kind, v: VllmInfo) -> str:
    classify = v.pooling_tasks is None or "classify" in v.pooling_tasks
    if kind == "discriminative":
        if not classify:
            return (
                "`classify`, which vLLM does not list for this model: the comparison shows what "
                "rmserve's engine makes of it"
            )
        return f"`classify`: one row per conversation, the sequence pooled {v.seq_pooling_type}"
    if v.pooling_tasks is None and v.seq_pooling_type == "LAST":
        prefix = "or, if the engine serves it, `classify` of each step's prefix (reuse_prefix)"
    elif classify and v.seq_pooling_type == "LAST":
        prefix = "or `classify` of each step's prefix (options.reuse_prefix: the prefix cache)"
    elif not classify:
        prefix = "(no `classify` here: options.reuse_prefix falls back to `token_classify`)"
    else:
        prefix = f"(no `classify` of prefixes: sequences are pooled {v.seq_pooling_type})"
    return f"`token_classify` rows at the step tags {prefix}"


def _dtype_note(auto: str | None, config: ConfigInfo | None) -> str:
    checkpoint = config.dtype if config is not None else None
    note = f"{auto} with `engine.dtype: auto`"
    if checkpoint and auto and checkpoint != auto:
        note += f" (the checkpoint is {checkpoint}; `engine.dtype: {checkpoint}` keeps it)"
    return note


def _format_comparison(c: ComparisonInfo) -> Iterator[str]:
    if not c.ran:
        yield f"comparison     {c.reason}"
        return
    reference = f"transformers ({c.reference_class}, float32)" if c.reference_class else (
        "no transformers reference (see the verdict)"
    )  # fmt: skip
    yield (
        f"comparison     vLLM CPU engine (float32, `{c.task}`) vs {reference}, same tokens; "
        "raw head outputs:"
    )
    engine = c.engine or []
    for index, got in enumerate(engine):
        name = "sequence" if c.task == "classify" else f"step {index + 1}"
        yield f"  {name:<12} vLLM         {_row(got)}"
        if c.engine_prefix is not None:
            yield f"  {'':<12} vLLM prefix  {_row(c.engine_prefix[index])} (reuse_prefix)"
        if c.reference is not None:
            yield f"  {'':<12} transformers {_row(c.reference[index])}"
    if c.engine_scores is not None:
        yield f"  score        vLLM         {_row(c.engine_scores)}"
    if c.reference_scores is not None:
        yield f"  {'':<12} transformers {_row(c.reference_scores)}"
    if c.max_abs_diff is not None:
        yield f"  max |diff|   {c.max_abs_diff:.2e} (tolerance {c.tolerance:g})"
    yield f"  verdict      {c.verdict}: {c.explanation}"


def _row(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:+.6f}" for v in values) + "]"


def _verdict(report: Report) -> str:
    kind = report.kind.kind if report.kind is not None else None
    if report.problems:
        return f"result         rmserve cannot serve {report.model} as it is (exit 2)"
    if report.failures:
        return f"result         check the comparison before serving it as {kind} (exit 1)"
    compared = report.comparison is not None and report.comparison.verdict == "agree"
    return f"result         ready to serve as {kind}" + (
        ", vLLM agreeing with transformers" if compared else ""
    )


def main(
    location: str,
    *,
    kind: Kind | None,
    compare: bool | None,
    trust_remote_code: bool,
    step_tag: str | None,
    as_json: bool,
) -> int:
    """The command: the report on stdout, as text or one JSON object; everything vLLM,
    transformers and the engine process print goes to stderr (so the JSON stays parseable)."""
    out = _report_stream()
    try:
        report = inspect_model(
            location,
            kind=kind,
            compare=compare,
            trust_remote_code=trust_remote_code,
            step_tag=step_tag,
        )
        if as_json:
            out.write(json.dumps(report.to_json()) + "\n")
        else:
            out.write(format_text(report))
        if as_json:  # the text report lists them already
            for problem in report.problems:
                print(f"error: {problem}", file=sys.stderr)
        return report.exit_code
    finally:
        out.flush()


def _report_stream() -> TextIO:
    """A stream on the original stdout, with file descriptor 1 (which libraries and the
    engine's child processes inherit) pointing at stderr from now on."""
    sys.stdout.flush()
    with contextlib.suppress(OSError, ValueError):
        saved = os.dup(1)
        os.dup2(2, 1)
        return open(saved, "w", encoding="utf-8", closefd=True)
    return sys.stdout
