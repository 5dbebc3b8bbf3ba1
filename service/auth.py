"""API keys: who may call /v1/* and /get_reward, with which models, under which quotas.

The keys file (RMSERVE_API_KEYS_FILE, YAML) holds SHA-256 digests of the keys, never the keys:

    defaults:                        # quota fields of every key that does not set its own
      requests_per_s: 20             # token bucket: the sustained rate ...
      burst: 40                      # ... and the requests allowed at once (default: the rate)
      max_concurrent_items: 4096     # items of the key's requests in flight at once
    keys:
      - name: team-a                 # unique; shown in logs and errors (never the key)
        sha256: 9f86d081884c7d65...  # hex digest of the key; `rmserve api-key` prints both
        models: [skywork-rm, math]   # default ["*"]: every model
        requests_per_s: 5            # overrides the default; null: no limit
        tenants: [rl-team]           # whom its requests count for (service.tenants)
    tenants:                         # weights and priority classes of shared deployments
      - {name: rl-team, weight: 3, priority: training}

Keys are random 32-byte tokens (`rms_` + secrets.token_urlsafe(32)), so one fast unsalted hash
is the right store: salts and slow hashes (bcrypt, argon2) protect guessable passwords from
dictionary attacks, and 256 random bits cannot be guessed, so a stolen file reveals no key. A
fast hash costs a microsecond per request and finds the key with one dict lookup (no
comparison loop whose timing could leak anything).

A request carries its key as `Authorization: Bearer <key>`, or as HTTP Basic credentials with
the key as the password, `Authorization: Basic base64(<name>:<key>)`: what an HTTP client sends
for a URL with user info (`http://team-a:KEY@host:8000/get_reward`), the only way to give a
trainer without header options (OpenRLHF) a key. The user name is not checked (rmserve's
convention is the key's name, for whoever reads the URL): the key alone identifies the caller,
so a name to match would add a way to fail and no secret. A 401 names what is wrong with the
header and advertises both schemes (`WWW-Authenticate: Bearer, Basic realm="rmserve"`).

Without a keys file authentication is off (local use): every request is the "anonymous" key,
with every model and no quota. Health, readiness and metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rmserve.service.metrics import Metrics
from rmserve.service.protocol import Priority
from rmserve.service.quotas import Lease, Quota
from rmserve.service.scheduling import PRIORITIES
from rmserve.service.tenants import Tenancy, Tenant, TenantEntry
from rmserve.web.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

KEY_PREFIX = "rms_"
ALL_MODELS = "*"
ANONYMOUS = "anonymous"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
BASIC_CHALLENGE = 'Basic realm="rmserve"'


class KeysFileError(ValueError):
    """The keys file is missing, not YAML, or invalid; the message names entry and field."""


class QuotaFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_concurrent_items: int | None = Field(default=None, ge=1)


class KeyEntry(QuotaFields):
    name: str = Field(pattern=NAME_PATTERN)
    sha256: str
    models: list[str] = Field(default_factory=lambda: [ALL_MODELS], min_length=1)
    # The tenants its requests may name (the first by default); None: one named after the key.
    tenants: list[str] | None = Field(default=None, min_length=1)

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == ANONYMOUS:
            raise ValueError(f"{ANONYMOUS!r} is reserved for requests while auth is off")
        return name

    @field_validator("sha256", mode="before")
    @classmethod
    def _digest(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.startswith(KEY_PREFIX):  # never echo it: it is a secret
            raise ValueError(
                "this is a key, not its SHA-256 digest; keep keys out of this file "
                "(`rmserve api-key NAME` prints the entry to add)"
            )
        digest = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError("must be the 64 hex digits of the key's SHA-256 digest")
        return digest

    @field_validator("models")
    @classmethod
    def _model_names(cls, models: list[str]) -> list[str]:
        if any(not model.strip() for model in models):
            raise ValueError("model names must not be empty")
        return models


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: QuotaFields = Field(default_factory=QuotaFields)
    keys: list[KeyEntry] = Field(min_length=1)
    tenants: list[TenantEntry] = Field(default_factory=list)


@dataclass(frozen=True)
class ApiKey:
    """An authenticated caller: the key's name, the models it may use, its quota."""

    name: str
    models: frozenset[str] | None = None  # None: every model
    quota: Quota = field(default_factory=Quota)
    tenants: tuple[Tenant, ...] = ()  # the first by default; (): one named after the key

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def tenancies(self) -> tuple[Tenant, ...]:
        """The tenants it may act for, its default first."""
        return self.tenants or (Tenant(self.name),)

    def tenancy(self, tenant: str | None = None, priority: Priority | None = None) -> Tenancy:
        """Whom a request counts for, and its class (defaults: the key's first tenant and its
        class); Forbidden naming the option when the key may not use them."""
        tenants = self.tenancies()
        chosen = (
            tenants[0] if tenant is None else next((t for t in tenants if t.name == tenant), None)
        )
        if chosen is None:
            allowed = ", ".join(t.name for t in tenants)
            raise Forbidden(
                f"key {self.name!r} may not act for tenant {tenant!r}; allowed: {allowed}",
                param="options.tenant",
            )
        if priority is not None and priority not in chosen.priorities:
            raise Forbidden(
                f"tenant {chosen.name!r} may not use priority {priority!r}; allowed: "
                + ", ".join(chosen.priorities),
                param="options.priority",
            )
        return Tenancy(chosen.name, chosen.weight, priority or chosen.priority)


# With authentication off: one tenant, any class.
ANONYMOUS_KEY = ApiKey(ANONYMOUS, tenants=(Tenant(ANONYMOUS, priorities=PRIORITIES),))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def load_keys(path: Path) -> dict[str, ApiKey]:
    """The keys of a keys file by SHA-256 digest; KeysFileError naming the entry and field."""
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KeysFileError(f"keys file {path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise KeysFileError(f"keys file {path}: not valid YAML: {exc}") from None
    try:
        parsed = KeysFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_where(raw, err['loc'])}: {err['msg']}" for err in exc.errors())
        raise KeysFileError(f"keys file {path}: {problems}") from None
    tenants: dict[str, Tenant] = {}
    for index, tenant in enumerate(parsed.tenants):
        if tenant.name in tenants:
            raise KeysFileError(
                f"keys file {path}: tenants[{index}] ({tenant.name!r}).name: defined twice"
            )
        tenants[tenant.name] = Tenant.from_entry(tenant)
    keys: dict[str, ApiKey] = {}
    names: dict[str, int] = {}
    for index, entry in enumerate(parsed.keys):
        where = f"keys file {path}: keys[{index}] ({entry.name!r})"
        if entry.name in names:
            raise KeysFileError(f"{where}.name: keys[{names[entry.name]}] has the same name")
        if entry.sha256 in keys:
            other = keys[entry.sha256].name
            raise KeysFileError(f"{where}.sha256: the same key as {other!r}; one name per key")
        names[entry.name] = index
        try:
            quota = _quota(entry, parsed.defaults)
        except ValueError as exc:
            raise KeysFileError(f"{where}: {exc}") from None
        models = None if ALL_MODELS in entry.models else frozenset(entry.models)
        keys[entry.sha256] = ApiKey(entry.name, models, quota, _tenants(entry, tenants, where))
    return keys


def _tenants(entry: KeyEntry, tenants: Mapping[str, Tenant], where: str) -> tuple[Tenant, ...]:
    """The tenants a key may act for; KeysFileError naming an undefined one."""
    if entry.tenants is None:  # a tenant of its own, unless the file defines its name
        return (tenants.get(entry.name, Tenant(entry.name)),)
    for name in entry.tenants:
        if name not in tenants:
            defined = ", ".join(sorted(tenants)) or "none (add a `tenants:` list)"
            raise KeysFileError(f"{where}.tenants: unknown tenant {name!r}; defined: {defined}")
    return tuple(tenants[name] for name in entry.tenants)


def _quota(entry: KeyEntry, defaults: QuotaFields) -> Quota:
    """The entry's quota fields, each from the entry when it sets it (null: no limit), else
    from the defaults."""
    values = {
        name: getattr(entry if name in entry.model_fields_set else defaults, name)
        for name in QuotaFields.model_fields
    }
    rate, burst = values["requests_per_s"], values["burst"]
    if rate is None:
        if entry.burst is not None:
            raise ValueError("burst: needs requests_per_s (here or in defaults)")
        burst = None
    elif burst is None:
        burst = max(1, math.ceil(rate))
    return Quota(rate, burst, values["max_concurrent_items"])


def _where(raw: Any, loc: tuple[int | str, ...]) -> str:
    """An error location with the entry's name: keys[1] ('team-b').sha256, tenants[0] ..."""
    parts = [str(part) for part in loc]
    if len(loc) >= 2 and loc[0] in ("keys", "tenants") and isinstance(loc[1], int):
        entry = raw[loc[0]][loc[1]] if isinstance(raw, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        head = f"{loc[0]}[{loc[1]}]" + (f" ({name!r})" if isinstance(name, str) else "")
        return ".".join([head, *parts[2:]])
    return ".".join(parts) or "the file"


class Authenticator:
    """Checks the key of a request, Bearer or Basic (401), and the models it may use (403)."""

    def __init__(self, keys: Mapping[str, ApiKey] | None, metrics: Metrics) -> None:
        self._keys, self._metrics = keys, metrics

    @classmethod
    def from_file(cls, path: Path | None, models: Iterable[str], metrics: Metrics) -> Authenticator:
        if path is None:
            log.warning(
                "authentication is off (no RMSERVE_API_KEYS_FILE): /v1/* and /get_reward are "
                "open to anyone who can reach this port"
            )
            return cls(None, metrics)
        keys = load_keys(path)
        known = set(models)
        for key in keys.values():
            if unknown := sorted((key.models or set()) - known):
                log.warning("API key %r names models not in the registry: %s", key.name, unknown)
        log.info("authentication is on: %d API keys from %s", len(keys), path)
        return cls(keys, metrics)

    def authenticate(self, request: Request) -> ApiKey:
        if self._keys is None:
            return ANONYMOUS_KEY
        header = request.headers.get("authorization")
        if header is None:
            raise self._unauthorized(
                "missing API key: send the header 'Authorization: Bearer <key>', or Basic "
                "credentials with the key as the password (a URL's http://NAME:KEY@host)"
            )
        scheme, _, credentials = header.partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            if not credentials or " " in credentials:
                raise self._unauthorized(
                    "malformed Authorization header: expected 'Bearer <key>'", "invalid_request"
                )
            token, error = credentials, "invalid_token"
        elif scheme.lower() == "basic":
            token, error = self._basic_password(credentials), None
        else:
            raise self._unauthorized(
                "malformed Authorization header: expected 'Bearer <key>' or "
                "'Basic base64(NAME:KEY)'",
                "invalid_request",
            )
        key = self._keys.get(hash_key(token))
        if key is None:
            raise self._unauthorized("invalid API key", error)
        return key

    def _basic_password(self, credentials: str) -> str:
        """The password of Basic credentials (the key), or 401 saying what is malformed; the
        user part is not checked. Never echoes the credentials: they hold the key."""
        malformed = "malformed Authorization header: Basic credentials"
        if not credentials or " " in credentials:
            raise self._unauthorized(f"{malformed} must be one base64 token, base64(NAME:KEY)")
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except binascii.Error:
            raise self._unauthorized(f"{malformed} are not valid base64") from None
        except UnicodeDecodeError:
            raise self._unauthorized(f"{malformed} are not UTF-8 once decoded") from None
        _, colon, password = decoded.partition(":")
        if not colon:
            raise self._unauthorized(f"{malformed} have no ':' between the user and the key")
        if not password:
            raise self._unauthorized(
                f"{malformed} have an empty password: the API key goes in the password "
                "(NAME:KEY; in a URL, http://NAME:KEY@host)"
            )
        return password

    def _unauthorized(self, message: str, bearer_error: str | None = None) -> Unauthorized:
        """401 advertising both schemes; `bearer_error`: RFC 6750's error code for a request
        that used Bearer (or no known scheme)."""
        self._metrics.auth_failures.labels("unauthorized").inc()
        bearer = f'Bearer error="{bearer_error}"' if bearer_error else "Bearer"
        return Unauthorized(message, headers={"WWW-Authenticate": f"{bearer}, {BASIC_CHALLENGE}"})

    def authorize(self, key: ApiKey, models: Iterable[str], param: str = "model") -> None:
        """Forbidden (403, naming the key and the model) unless the key may use every model."""
        for model in models:
            if not key.may_use(model):
                self._metrics.auth_failures.labels("forbidden").inc()
                log.info("API key %r was refused model %r", key.name, model)
                allowed = ", ".join(sorted(key.models or ())) or "none"
                raise Forbidden(
                    f"key {key.name!r} may not use model {model!r}; allowed: {allowed}",
                    param=param,
                )


async def current_key(request: Request) -> ApiKey:
    """The dependency: the caller's key (the app's Authenticator is in app.state)."""
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator.authenticate(request)


Caller = Annotated[ApiKey, Depends(current_key)]

# What a scoring route calls with the caller's key, the models and the number of items of its
# request: 403 unless the key may use the models, else the lease of its quota (429 beyond it).
Admit = Callable[[ApiKey, Sequence[str], int], Awaitable[Lease]]
