"""The order in which a model's waiting jobs go to its workers when several training jobs share
a deployment (issue 26): strict priority between classes, weighted fair share between tenants
within a class, earliest deadline first within a tenant.

- **Bundles.** The unit of scheduling is a bundle: the jobs of one request that share a prompt
  (a GRPO group). A bundle is taken whole, never split between fetches, so its items reach one
  engine together and share their prompt's computation.
- **Classes.** `interactive` > `training` > `batch`: a worker takes from the highest class with
  waiting work. Against starvation, a bundle ages: after `starvation_s` waiting in its class
  behind a higher class's work it moves up one class (and again after as long in that one), so
  a lower class under a saturating higher one still moves, at the higher class's tenant shares.
  Only time spent behind higher work counts: when a class is the highest with work, its
  bundles are being served by share and do not age (ageing them would favour the tenant served
  least, undoing the weights within the class).
- **Tenants.** Within a class, deficit round robin over the tenants with waiting work: the
  tenant in front takes bundles while its deficit covers their items, then goes to the back
  with `quantum * weight` more items of credit. Over time each tenant gets items in proportion
  to its weight; a tenant alone gets everything (fairness costs nothing without contention).
- **Deadlines.** Within a tenant and class, the bundle with the earliest deadline first (ties:
  arrival). A bundle whose deadline is nearer than `margin_s` (the time its scoring takes) is
  not handed out: `take` returns it as expired, to be answered `timeout` at once.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import get_args

from rmserve.service.jobs import Job
from rmserve.service.protocol import Priority

PRIORITIES: tuple[Priority, ...] = get_args(Priority)  # highest first
QUANTUM = 16  # items of credit a weight of 1 earns per round
STARVATION_S = 30.0


@dataclass(order=True)
class _Waiting:
    rank: float  # its deadline (0 in fifo mode): the order within a tenant's class
    seq: int
    deadline: float = field(compare=False)
    jobs: list[Job] = field(compare=False)
    tenant: str = field(compare=False)
    level: int = field(compare=False)  # index in PRIORITIES: its class now (it ages upwards)
    since: float = field(compare=False, default=0.0)  # its class's blocked clock at entry


@dataclass
class _Class:
    """The tenants with waiting bundles in one priority class, in their round-robin order."""

    queues: dict[str, list[_Waiting]] = field(default_factory=dict)  # heaps by deadline
    active: deque[str] = field(default_factory=deque)
    deficit: dict[str, float] = field(default_factory=dict)
    arrivals: deque[_Waiting] = field(default_factory=deque)  # by entry; taken ones linger


class FairScheduler:
    """The waiting jobs of one model. Not thread-safe; the caller serializes (one event loop
    in embedded mode)."""

    def __init__(
        self, quantum: int = QUANTUM, starvation_s: float = STARVATION_S, fifo: bool = False
    ) -> None:
        """`fifo`: ignore tenants, classes and deadlines; bundles in arrival order (the
        baseline of benchmarks/tenant_fairness.py, and RMSERVE_SCHEDULING=fifo)."""
        self._fifo = fifo
        self._weights: dict[str, float] = {}
        self._quantum = quantum
        self._starvation_s = starvation_s
        self._classes = [_Class() for _ in PRIORITIES]
        self._gone: set[int] = set()  # seqs of bundles taken or moved, still in an arrivals
        # Per class: seconds it has had work waiting behind a higher class's (its ageing clock),
        # and when that was last brought up to date.
        self._blocked = [0.0] * len(PRIORITIES)
        self._clock: float | None = None
        self._seq = itertools.count()
        self._jobs = 0

    def __len__(self) -> int:
        """Jobs waiting."""
        return self._jobs

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def add(self, jobs: Sequence[Job], now: float | None = None) -> None:
        """Jobs of one request (or given back): each group of jobs sharing a prompt (prefix
        key) is a bundle; jobs without a key are bundles of one. A tenant's weight comes with
        its jobs (as configured on the gateway that admitted them; the latest counts)."""
        bundles: dict[str, list[Job]] = {}
        for job in jobs:
            key = job.prefix_key if job.prefix_key is not None else f"\0{job.id}"
            bundles.setdefault(key, []).append(job)
        self._tick(time.time() if now is None else now)
        for bundle in bundles.values():
            first = bundle[0]
            self._weights[first.tenant] = first.weight
            fifo, deadline = self._fifo, min(job.deadline for job in bundle)
            self._push(
                _Waiting(
                    rank=0.0 if fifo else deadline,
                    seq=next(self._seq),
                    deadline=deadline,
                    jobs=bundle,
                    tenant="" if fifo else first.tenant,
                    level=0 if fifo else PRIORITIES.index(first.priority),
                )
            )
            self._jobs += len(bundle)

    def take(
        self, max_jobs: int, now: float | None = None, margin_s: float = 0.0
    ) -> tuple[list[Job], list[Job]]:
        """(jobs to score: at most max_jobs unless one bundle is larger; jobs expired: their
        deadline is nearer than margin_s, to be answered at once)."""
        now = time.time() if now is None else now
        self._age(now)
        taken: list[Job] = []
        expired: list[Job] = []
        while (waiting := self._next()) is not None:
            if waiting.deadline < now + margin_s:
                self._pop(waiting)
                expired += waiting.jobs
                continue
            if taken and len(taken) + len(waiting.jobs) > max_jobs:
                break
            self._classes[waiting.level].deficit[waiting.tenant] -= len(waiting.jobs)
            self._pop(waiting)
            taken += waiting.jobs
            if len(taken) >= max_jobs:
                break
        self._jobs -= len(taken) + len(expired)
        return taken, expired

    def _credit(self, tenant: str) -> float:
        return self._quantum * self.weight(tenant)

    def _push(self, waiting: _Waiting) -> None:
        cls = self._classes[waiting.level]
        queue = cls.queues.setdefault(waiting.tenant, [])
        if not queue:
            cls.active.append(waiting.tenant)
            cls.deficit[waiting.tenant] = self._credit(waiting.tenant)
        heapq.heappush(queue, waiting)
        if waiting.level > 0:  # the top class does not age
            waiting.since = self._blocked[waiting.level]
            cls.arrivals.append(waiting)

    def _tick(self, now: float) -> None:
        """Run the ageing clocks of the classes below one with work, up to `now`."""
        if self._clock is not None and now > self._clock:
            above = False
            for level, cls in enumerate(self._classes):
                if above:
                    self._blocked[level] += now - self._clock
                above = above or bool(cls.active)
        self._clock = now if self._clock is None else max(self._clock, now)

    def _age(self, now: float) -> None:
        """Bundles that waited starvation_s behind higher classes move up one."""
        self._tick(now)
        for level in range(1, len(self._classes)):
            arrivals = self._classes[level].arrivals
            while arrivals:
                oldest = arrivals[0]
                if oldest.seq in self._gone:
                    self._gone.discard(arrivals.popleft().seq)
                elif self._blocked[level] - oldest.since >= self._starvation_s:
                    self._pop(oldest)
                    self._gone.discard(arrivals.popleft().seq)
                    oldest.level = level - 1
                    oldest.seq = next(self._seq)
                    self._push(oldest)
                else:
                    break

    def _next(self) -> _Waiting | None:
        """The bundle to take next: by class, then tenant share, then deadline."""
        for cls in self._classes:
            if not cls.active:
                continue
            # The tenant in front takes while its credit covers its next bundle; else it goes
            # to the back with more credit (a bundle larger than one round's credit waits for
            # as many rounds as it needs, the others taking theirs meanwhile).
            while True:
                tenant = cls.active[0]
                head = cls.queues[tenant][0]
                if cls.deficit[tenant] >= len(head.jobs):
                    return head
                cls.deficit[tenant] += self._credit(tenant)
                cls.active.rotate(-1)
        return None

    def _pop(self, waiting: _Waiting) -> None:
        cls = self._classes[waiting.level]
        queue = cls.queues[waiting.tenant]
        if queue[0] is waiting:
            heapq.heappop(queue)
        else:
            queue.remove(waiting)
            heapq.heapify(queue)
        if waiting.level > 0:
            self._gone.add(waiting.seq)
        if not queue:
            del cls.queues[waiting.tenant]
            del cls.deficit[waiting.tenant]
            cls.active.remove(waiting.tenant)
