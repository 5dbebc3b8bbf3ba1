"""Which sandbox the judges of this process call: the sidecar at `sandbox_url`, or (embedded
mode without one) the tools in this process tree — code still runs only inside bubblewrap."""

from __future__ import annotations

import logging

from rmserve.models.spec import CodeTestsSpec, GenerativeSpec, ModelSpec
from rmserve.sandbox.client import HttpToolbox
from rmserve.service.config import Settings
from rmserve.wire.tools import Toolbox

log = logging.getLogger(__name__)

DEFAULT_SIDECAR = "http://127.0.0.1:8002"


def needs_tools(specs: list[ModelSpec]) -> bool:
    """Agentic judges and code_tests verifiers call the sandbox."""
    return any(
        (isinstance(spec, GenerativeSpec) and spec.options.tools) or isinstance(spec, CodeTestsSpec)
        for spec in specs
    )


def gateway_toolbox(settings: Settings) -> Toolbox | None:
    """A distributed gateway's sandbox (python graders): the configured sidecar, if any."""
    return HttpToolbox(settings.sandbox_url) if settings.sandbox_url else None


def sidecar(settings: Settings) -> Toolbox:
    """A worker's sandbox: the sidecar beside it."""
    return HttpToolbox(settings.sandbox_url or DEFAULT_SIDECAR)


def embedded_toolbox(settings: Settings) -> Toolbox:
    """Embedded mode's sandbox: the configured sidecar, else the tools in this process tree."""
    if settings.sandbox_url:
        return HttpToolbox(settings.sandbox_url)
    from rmserve.sandbox.config import SandboxSettings
    from rmserve.sandbox.tools import LocalToolbox
    from rmserve.wire.errors import ToolError

    sandbox = SandboxSettings()
    try:
        return LocalToolbox(sandbox)
    except ToolError as exc:  # no working bubblewrap: serve the other tools, never run code
        log.warning("code_run is disabled: %s", exc.message)
        others = [name for name in sandbox.tools if name != "code_run"]
        return LocalToolbox(sandbox.model_copy(update={"tools": others}))
