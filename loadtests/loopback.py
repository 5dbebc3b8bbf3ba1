"""The guard of every load generator here: it sends only to loopback addresses."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def require_loopback(base_url: str) -> None:
    """Raise ValueError unless `base_url` is an http(s) URL on a loopback address."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"{base_url!r} is not an http(s) URL")
    if host.lower() in _LOOPBACK_NAMES:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{base_url!r} is not a loopback address; this load test is local only")
