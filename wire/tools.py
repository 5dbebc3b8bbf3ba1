"""Wire models of the sandbox: a tool call, its context and its evidence. Shared by the sidecar
(`sandbox.app`), its HTTP client (`sandbox.client`) and the judging loop, which only needs the
`Toolbox` protocol (in-process tools in embedded mode, the sidecar over HTTP otherwise)."""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from rmserve.wire.trajectory import Document


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolContext(_Wire):
    """What a call may refer to besides its arguments."""

    images: list[str] = Field(
        default_factory=list,
        description="data: URLs: the item's images, then earlier crops (crop's `image` index)",
    )
    documents: list[Document] = Field(
        default_factory=list, description="passages `search` ranks (else the configured corpus)"
    )


class ToolCall(_Wire):
    arguments: dict[str, Any] = Field(default_factory=dict)
    context: ToolContext = ToolContext()


class ToolOutput(_Wire):
    text: str = ""
    images: list[str] = Field(default_factory=list, description="data: URLs (PNG)")
    data: dict[str, Any] | None = Field(default=None, description="the tool's structured result")


class ToolErrorBody(_Wire):
    type: str
    message: str


class ToolResult(_Wire):
    """Evidence: a tool's output, or why it failed; and how long it took."""

    tool: str
    output: ToolOutput | None = None
    error: ToolErrorBody | None = None
    elapsed_s: float = 0.0


class ToolSpec(_Wire):
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The OpenAI / HF chat-template shape of a tool."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class ToolList(_Wire):
    tools: list[ToolSpec]


class Toolbox(Protocol):
    async def specs(self) -> list[ToolSpec]: ...

    async def call(self, name: str, call: ToolCall) -> ToolResult:
        """Run one tool. Failures (unknown tool, bad arguments, limits, a busy or unreachable
        sandbox) come back as `ToolResult.error`, which the judge reads; it never raises."""
        ...
