"""What the model service tells operators: Prometheus metrics and JSON log lines.

Metrics live in a registry of their own (one per server, so that two servers in one
process, as in the tests, keep separate counts) and are served as Prometheus text on a side
HTTP port (`http://host:PORT/metrics`). Throughput is a counter: tokens/s is
`rate(memlm_tokens_total{kind="generated"}[1m])`; each request's decode speed is also kept
as a histogram. Memory sizes are read from the store at scrape time.

Logs are one JSON object per line on stderr, each with the request id that the client sent
(`x-request-id` metadata) or the server chose, and that the server sends back.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SPEED_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)


class ServerMetrics:
    def __init__(self, memory_sizes: Callable[[], Iterable[tuple[str, int, int]]] | None = None):
        """`memory_sizes()` yields (memory, tokens, bytes) for every memory, at scrape time."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "memlm_requests", "Finished requests by method and status code", ["method", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "memlm_request_seconds", "Request time, queueing included", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("memlm_tokens", "Tokens processed: ingested, prompt, generated", ["kind"], registry=r)
        self.first_token_seconds = Histogram(
            "memlm_time_to_first_token_seconds", "Generate: arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode_speed = Histogram(
            "memlm_generate_tokens_per_second", "Generate: tokens/s of each request", buckets=SPEED_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("memlm_queue_depth", "Requests waiting for the model", registry=r)
        self.running = Gauge("memlm_running_requests", "Requests computing on the model", registry=r)
        if memory_sizes is not None:
            r.register(_MemorySizes(memory_sizes))
        self._http = None

    def count(self, kind: str) -> float:
        """Tokens of a kind so far ("ingested", "prompt", "generated")."""
        return self.registry.get_sample_value("memlm_tokens_total", {"kind": kind}) or 0.0

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0: any free port); returns the bound port."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _MemorySizes:
    """Collector of per-memory sizes, asked of the store on each scrape."""

    def __init__(self, sizes: Callable[[], Iterable[tuple[str, int, int]]]):
        self.sizes = sizes

    def collect(self):
        tokens = GaugeMetricFamily("memlm_memory_tokens", "Tokens held per memory layer", labels=["memory"])
        size = GaugeMetricFamily("memlm_memory_bytes", "Bytes held by a memory", labels=["memory"])
        try:
            for memory, count, nbytes in self.sizes():
                tokens.add_metric([memory], count)
                size.add_metric([memory], nbytes)
        except Exception as error:  # a store that is down must not break the scrape of everything else
            logging.getLogger("memlm.serve").warning("memory sizes unavailable: %s", error)
        yield tokens
        yield size


# -- JSON logs -------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """`log.info("generate", extra={"fields": {...}})` -> {"time": ..., "level": ..., "event": "generate", ...}."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Send memlm's loggers to stderr as JSON lines (the servers' `run` calls this)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("memlm")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
