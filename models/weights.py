"""Resolve a model's weights to a local directory: a local path as is, a hub id via the HF cache."""

from __future__ import annotations

from pathlib import Path

from rmserve.models.errors import ModelLoadError

# Files a reward model needs: config, weights, tokenizer, chat template.
_ALLOW = [
    "*.json",
    "*.safetensors",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.tiktoken",
    "*.py",
]


def resolve_weights(location: str, revision: str | None, *, allow_remote_code: bool) -> Path:
    """Return a local directory holding the weights, downloading from the hub if needed."""
    path = Path(location)
    if path.is_absolute():
        if not path.is_dir():
            raise ModelLoadError(f"weights directory {location} does not exist")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"weights directory {location} has no config.json")
        return path
    from huggingface_hub import snapshot_download

    allow = _ALLOW if allow_remote_code else [p for p in _ALLOW if p != "*.py"]
    try:
        local = snapshot_download(location, revision=revision, allow_patterns=allow)
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        reason = str(exc).splitlines()[0].removeprefix("Got: ") if str(exc) else repr(exc)
        raise ModelLoadError(
            f"weights {location!r}"
            + (f" (revision {revision})" if revision else "")
            + f" are not in the local cache and could not be fetched from the model hub: {reason}"
        ) from exc
    return Path(local)
