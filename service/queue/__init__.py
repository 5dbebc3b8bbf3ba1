"""The job queue between gateway and workers: an interface with in-process and Redis backends."""

from rmserve.service.queue.base import JobQueue, QueueFullError, QueueUnavailableError
from rmserve.service.queue.memory import InProcessQueue

__all__ = ["InProcessQueue", "JobQueue", "QueueFullError", "QueueUnavailableError"]
