"""What a model-service request waits for before it computes: a place in the queue and a
compute slot (`Admission`), and its memory's lock (`MemoryLocks`). Every wait looks, every
`POLL_S`, whether the client is still there, and stops with ClientGone when it is not.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from memlm.serve.errors import ClientGone, QueueFull
from memlm.serve.metrics import ServerMetrics

Alive = Callable[[], bool]  # whether the request's client is still there
POLL_S = 0.05  # how often a waiting request looks whether its client is still there


class Admission:
    """At most `concurrency` requests compute at once and `queue_size` more wait; beyond that
    a request is refused at once rather than queued without bound."""

    def __init__(self, concurrency: int, queue_size: int, metrics: ServerMetrics):
        if concurrency < 1 or queue_size < 0:
            raise ValueError("concurrency must be >= 1 and queue_size >= 0")
        self.capacity = concurrency + queue_size
        self._slots = threading.BoundedSemaphore(concurrency)
        self._guard = threading.Lock()
        self._admitted = self._running = 0
        metrics.queue_depth.set_function(lambda: self._admitted - self._running)
        metrics.running.set_function(lambda: self._running)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """A place in the queue, taken on arrival (raises QueueFull)."""
        with self._guard:
            if self._admitted >= self.capacity:
                raise QueueFull(
                    f"the server is busy: {self.capacity} requests are running or queued; retry with backoff"
                )
            self._admitted += 1
        try:
            yield
        finally:
            with self._guard:
                self._admitted -= 1

    @contextmanager
    def compute(self, alive: Alive) -> Iterator[None]:
        """Wait (in the queue) for a compute slot; inside `admit`."""
        while not self._slots.acquire(timeout=POLL_S):
            if not alive():
                raise ClientGone()
        with self._guard:
            self._running += 1
        try:
            yield
        finally:
            with self._guard:
                self._running -= 1
            self._slots.release()


class MemoryLocks:
    """Per memory: any number of readers, or one writer. A waiting writer keeps new readers
    out, so a stream of Generates cannot starve an Ingest."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers: Counter[str] = Counter()
        self._writing: set[str] = set()
        self._writers_waiting: Counter[str] = Counter()

    def _wait(self, ready: Callable[[], bool], alive: Alive) -> None:
        while not ready():
            if not alive():
                raise ClientGone()
            self._cond.wait(POLL_S)

    @contextmanager
    def read(self, memory: str, alive: Alive) -> Iterator[None]:
        with self._cond:
            self._wait(lambda: memory not in self._writing and not self._writers_waiting[memory], alive)
            self._readers[memory] += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[memory] -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self, memory: str, alive: Alive) -> Iterator[None]:
        with self._cond:
            self._writers_waiting[memory] += 1
            try:
                self._wait(lambda: memory not in self._writing and not self._readers[memory], alive)
            finally:
                self._writers_waiting[memory] -= 1
            self._writing.add(memory)
        try:
            yield
        finally:
            with self._cond:
                self._writing.discard(memory)
                self._cond.notify_all()
