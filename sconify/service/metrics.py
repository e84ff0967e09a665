"""Prometheus metrics of the service (``GET /metrics``), kept with ``prometheus_client`` in a private registry.

Event counters live in the HTTP process. Job gauges and conversion durations are read from the durable job
store at scrape time, so they count the work of every worker process (and survive restarts).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = ("queued", "running", "succeeded", "failed")
DURATION_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _StoreCollector(Collector):
    """Job counts by status and the durations of finished conversions, from the store."""

    def __init__(self, counts: Callable[[], Mapping[str, int]],
                 durations: Callable[[set[str]], Iterable[tuple[str, str, float]]]) -> None:
        self._counts = counts
        self._durations = durations
        self._lock = threading.Lock()
        # Durations already observed, by job id, so that a scrape only reads jobs finished since the last.
        self._seen: set[str] = set()
        self._buckets = {status: [0] * (len(DURATION_BUCKETS) + 1) for status in ("succeeded", "failed")}
        self._sums = {"succeeded": 0.0, "failed": 0.0}

    def collect(self) -> Iterable[Metric]:
        counts = self._counts()
        gauge = GaugeMetricFamily("sconify_service_jobs", "Conversion jobs in the store by status.",
                                  labels=["status"])
        for status in STATUSES:
            gauge.add_metric([status], float(counts.get(status, 0)))
        yield gauge
        with self._lock:
            for job_id, status, seconds in self._durations(self._seen):
                if job_id in self._seen or status not in self._buckets:
                    continue
                self._seen.add(job_id)
                self._sums[status] += seconds
                for i, bound in enumerate((*DURATION_BUCKETS, float("inf"))):
                    if seconds <= bound:  # counted in its own bucket; the exposition cumulates
                        self._buckets[status][i] += 1
                        break
            hist = HistogramMetricFamily("sconify_service_conversion_seconds",
                                         "Wall time of finished conversion attempts (the last attempt of a job).",
                                         labels=["status"])
            for status, counts_ in self._buckets.items():
                cumulative, running = [], 0
                for bound, n in zip((*DURATION_BUCKETS, float("inf")), counts_, strict=True):
                    running += n
                    cumulative.append((_bound(bound), running))
                hist.add_metric([status], cumulative, self._sums[status])
        yield hist


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class Metrics:
    """The service's metrics; ``render()`` returns the Prometheus text exposition."""

    def __init__(self, counts: Callable[[], Mapping[str, int]],
                 durations: Callable[[set[str]], Iterable[tuple[str, str, float]]]) -> None:
        disable_created_metrics()  # the *_created series only add noise to a long-running service
        self.registry = CollectorRegistry(auto_describe=False)
        self.received = Counter("sconify_service_events_received", "Requests received on event endpoints.",
                                ["source"], registry=self.registry)
        self.rejected = Counter("sconify_service_events_rejected",
                                "Requests or events refused (authentication, malformed, too large, invalid).",
                                ["source", "reason"], registry=self.registry)
        self.ignored = Counter("sconify_service_events_ignored",
                               "Events acknowledged without a job (not a push, unrouted, own push).",
                               ["source", "reason"], registry=self.registry)
        self.queued = Counter("sconify_service_jobs_queued", "Pushes accepted as a new conversion job.",
                              ["source"], registry=self.registry)
        self.duplicates = Counter("sconify_service_events_duplicate",
                                  "Pushes that collapsed into an existing job (same repository and digest).",
                                  ["source"], registry=self.registry)
        self.latency = Histogram("sconify_service_event_seconds", "Time to answer an event request.",
                                 ["source"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_StoreCollector(counts, durations))

    def render(self) -> bytes:
        return generate_latest(self.registry)
