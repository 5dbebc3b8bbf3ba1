"""Optional API keys: when Settings.api_keys is set, /v1/* requires `Authorization: Bearer KEY`.

Health, readiness and metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

from fastapi import Request

from service.errors import Unauthorized


def api_key_check(api_keys: list[str]) -> Callable[[Request], Awaitable[None]]:
    keys = [key.encode() for key in api_keys]

    async def require_api_key(request: Request) -> None:
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Compare against every key, in constant time, so timing reveals nothing.
        if not any([secrets.compare_digest(token.encode(), key) for key in keys]):
            raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})

    return require_api_key
