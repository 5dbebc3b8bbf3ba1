"""Tenants: the training jobs (or teams) that share a deployment, each with a weight and a
priority class (service.scheduling orders the jobs by them). Configured in the keys file:

    tenants:
      - name: rl-team          # unique
        weight: 3              # > 0: its share of a saturated model relative to the others
        priority: training     # the class of its requests: interactive, training or batch
        priorities: [training, batch]  # classes its requests may ask for (default: its own
                                       # and those below it)
    keys:
      - name: team-a
        sha256: ...
        tenants: [rl-team]     # the tenants its requests may name, the first by default
                               # (default: a tenant named after the key, weight 1, training)

A request names its tenant and class in `options.tenant` and `options.priority` (defaults: the
key's first tenant and that tenant's class); one its key may not use is refused (403 naming
it). The tenancy of the request being served travels in a context variable from admission to
the jobs it makes (service.scoring), so every route (score, jobs, OpenRLHF, graders) carries it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rmserve.service.protocol import DEFAULT_PRIORITY, Priority
from rmserve.service.scheduling import PRIORITIES

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class TenantEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    weight: float = Field(default=1.0, gt=0)
    priority: Priority = DEFAULT_PRIORITY
    priorities: list[Priority] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _own_class_allowed(self) -> TenantEntry:
        if self.priorities is not None and self.priority not in self.priorities:
            raise ValueError(f"priorities must include the tenant's priority {self.priority!r}")
        return self


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    priority: Priority = DEFAULT_PRIORITY
    priorities: tuple[Priority, ...] = PRIORITIES[PRIORITIES.index(DEFAULT_PRIORITY) :]

    @classmethod
    def from_entry(cls, entry: TenantEntry) -> Tenant:
        allowed = entry.priorities or PRIORITIES[PRIORITIES.index(entry.priority) :]
        return cls(entry.name, entry.weight, entry.priority, tuple(allowed))


@dataclass(frozen=True)
class Tenancy:
    """Whom a request's jobs count for, and their class."""

    tenant: str
    weight: float
    priority: Priority


ANONYMOUS_TENANCY = Tenancy("anonymous", 1.0, DEFAULT_PRIORITY)
current_tenancy: ContextVar[Tenancy] = ContextVar("rmserve_tenancy", default=ANONYMOUS_TENANCY)
