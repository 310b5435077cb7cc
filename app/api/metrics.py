"""Prometheus metrics, one registry per app (no module globals: several apps live side by side in tests)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.vision.batcher import BatchInfo

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
# Squared L2 between dlib embeddings: same person mostly 0.1-0.3, different 0.5-1.0; 0.36 is the default cut.
DISTANCE_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.33, 0.36, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5, 2.0, 4.0)
# Requests or inputs per network call (max_batch is 32 by default).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# Recent requests kept for GET /metrics/summary (the web console's health page): enough for stable percentiles.
RECENT_WINDOW = 500


@dataclass(frozen=True, slots=True)
class RouteLatency:
    method: str
    route: str
    count: int
    p50_ms: float
    p95_ms: float
    max_ms: float



class _LiveGauges(Collector):
    """Values read when Prometheus scrapes: gallery size and the providers each network runs on."""

    def __init__(
        self, gallery_size: Callable[[], int | None], providers: Callable[[], Mapping[str, str | None]]
    ) -> None:
        self._gallery_size = gallery_size
        self._providers = providers

    def collect(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("facegate_gallery_faces", "Faces in the in-memory search index")
        value = self._gallery_size()
        if value is not None:
            size.add_metric([], float(value))
        yield size
        info = GaugeMetricFamily(
            "facegate_provider_info",
            "ONNX Runtime execution provider in use per network (1 = in use)",
            labels=["network", "provider"],
        )
        for network, provider in self._providers().items():
            info.add_metric([network, provider or "not_loaded"], 1.0)
        yield info


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Histogram(
            "facegate_request_duration_seconds",
            "HTTP request latency by method, route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "facegate_decisions",
            "Decisions made, by endpoint and outcome (verify: match, no_match; identify: match, unknown, ambiguous)",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.distances = Histogram(
            "facegate_decision_distance",
            "Squared L2 distance behind each decision (verify: to the identity or photo; identify: to the best candidate)",
            ["endpoint"],
            buckets=DISTANCE_BUCKETS,
            registry=self.registry,
        )
        self.enrolments = Counter("facegate_enrolments", "Faces enrolled", registry=self.registry)
        self.batch_items = Histogram(
            "facegate_inference_batch_items",
            "Requests served by one network call of the micro-batcher (network: detector or embedder; "
            "wide: the call had every core)",
            ["network", "wide"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "facegate_inference_batch_size",
            "Inputs of one network call of the micro-batcher: photos (detector) or face chips (embedder)",
            ["network"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.info = Gauge("facegate_model_info", "Model version served (1)", ["model_version"], registry=self.registry)
        # (method, route, seconds) of the latest requests: histograms cannot say what is recent.
        self.recent: deque[tuple[str, str, float]] = deque(maxlen=RECENT_WINDOW)

    def watch(self, gallery_size: Callable[[], int | None], providers: Callable[[], Mapping[str, str | None]]) -> None:
        self.registry.register(_LiveGauges(gallery_size, providers))

    def observe_batch(self, info: BatchInfo) -> None:
        """The pipeline's `on_batch` hook (inference threads): how much work each network call shared."""
        self.batch_items.labels(info.name, "true" if info.wide else "false").observe(info.items)
        self.batch_size.labels(info.name).observe(info.size)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)
        self.recent.append((method, route, seconds))

    def recent_latency(self) -> list[RouteLatency]:
        """p50/p95/max of the recent requests per route, most requested first."""
        by_route: dict[tuple[str, str], list[float]] = {}
        for method, route, seconds in list(self.recent):
            by_route.setdefault((method, route), []).append(seconds * 1000.0)
        rows = [
            RouteLatency(
                method,
                route,
                len(ms),
                float(np.percentile(ms, 50)),
                float(np.percentile(ms, 95)),
                float(max(ms)),
            )
            for (method, route), ms in by_route.items()
        ]
        return sorted(rows, key=lambda r: (-r.count, r.route, r.method))

    def observe_decision(self, endpoint: str, outcome: str, distance: float | None) -> None:
        self.decisions.labels(endpoint, outcome).inc()
        if distance is not None:
            self.distances.labels(endpoint).observe(distance)

    def render(self) -> bytes:
        return generate_latest(self.registry)
