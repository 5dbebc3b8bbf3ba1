"""The job queue between gateway and workers: an interface with in-process and Redis backends."""

from service.queue.base import JobQueue, QueueFullError, QueueUnavailableError
from service.queue.memory import InProcessQueue

__all__ = ["InProcessQueue", "JobQueue", "QueueFullError", "QueueUnavailableError"]
