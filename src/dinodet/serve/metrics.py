"""The service's Prometheus metrics, in a registry of its own (one per app, so that two apps in one
process, e.g. in tests, do not share or clash over the global registry)."""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401  (re-exported for the app)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; the tiny model on a CPU answers in tens of ms, a large one on a CPU in seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    """Requests (by route, method and status), errors (by reason), request latency, forward-pass
    batch sizes, queue depth and the bytes of decoded images queued (read from ``queue_depth`` and
    ``queue_bytes`` at each scrape)."""

    def __init__(self, max_batch: int, queue_depth: Callable[[], float],
                 queue_bytes: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("dinodet_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.errors = Counter("dinodet_errors", "requests answered with an error, by reason", ["reason"],
                              registry=self.registry)
        self.latency = Histogram("dinodet_request_latency_seconds", "time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("dinodet_batch_size", "images per forward pass",
                                    buckets=tuple(range(1, max_batch + 1)), registry=self.registry)
        self.queue_depth = Gauge("dinodet_queue_depth", "requests waiting for the model", registry=self.registry)
        self.queue_depth.set_function(queue_depth)
        self.queue_bytes = Gauge("dinodet_queue_bytes", "bytes of decoded images waiting for the model",
                                 registry=self.registry)
        self.queue_bytes.set_function(queue_bytes)

    def render(self) -> bytes:
        """The registry in the Prometheus text exposition format."""
        return generate_latest(self.registry)
