"""Prometheus metrics, one registry per app (no module globals: several apps live side by side in tests).

With several worker processes (`facegate serve --workers N`) the values live in files shared by the workers
(app/api/multiprocess.py) and every scrape and summary reports the whole server, whichever worker answers. Only
plain counters, histograms and gauges work there (no custom collector, no callback gauge, no Info): the gallery size
and providers are gauges each worker sets when they change.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from app.api.multiprocess import SharedRecent, forget_dead_processes, forget_process
from app.gallery.index import IndexStats
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



class _LocalRecent:
    """The latest requests of this process, in memory (one worker)."""

    def __init__(self, window: int) -> None:
        self._requests: deque[tuple[str, str, float]] = deque(maxlen=window)

    def append(self, method: str, route: str, seconds: float) -> None:
        self._requests.append((method, route, seconds))

    def latest(self) -> tuple[list[tuple[str, str, float]], int]:
        return list(self._requests), 1

    def close(self) -> None:
        pass


class Metrics:
    def __init__(self, shared: Path | None = None) -> None:
        """`shared`: the multiprocess directory when prometheus_client runs in that mode
        (app.api.multiprocess.shared_directory()), else None: this process's registry is the whole story."""
        self.shared = shared
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
        # Gauge modes for several workers: one series per value whatever the number of workers ("max": every worker
        # sets the same 1), and a worker's gauges leave with it ("live").
        self.info = Gauge(
            "facegate_model_info",
            "Model version served (1)",
            ["model_version"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        # Each worker's index converges on the database (every search replays the change log); the one that changed
        # its index last has applied the newest changes, so its size is the gallery's: "mostrecent", not a sum.
        self.gallery_faces = Gauge(
            "facegate_gallery_faces",
            "Faces in the in-memory search index",
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        # The body budget's use (image.max_inflight_bytes): a sum over the workers, each as of its last request or,
        # for the one answering the scrape, now.
        self.body_bytes = Gauge(
            "facegate_request_body_bytes_held",
            "Request-body bytes held by requests in flight (the worker's budget: FACEGATE_IMAGE__MAX_INFLIGHT_BYTES)",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.providers = Gauge(
            "facegate_provider_info",
            "ONNX Runtime execution provider in use per network (1 = in use)",
            ["network", "provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        # (method, route, seconds) of the latest requests: histograms cannot say what is recent.
        self.recent = SharedRecent(shared, RECENT_WINDOW) if shared is not None else _LocalRecent(RECENT_WINDOW)
        self._gallery: Callable[[], IndexStats | None] = lambda: None
        self._networks: Callable[[], Mapping[str, str | None]] = dict
        self._body_held: Callable[[], int] = lambda: 0
        self._gallery_seen: IndexStats | None = None
        self._providers_seen: dict[str, str] = {}

    def watch(
        self,
        gallery: Callable[[], IndexStats | None],
        providers: Callable[[], Mapping[str, str | None]],
        body_held: Callable[[], int] = lambda: 0,
    ) -> None:
        """Follow the index, the networks' providers and the request bytes held (read after each request and at each
        scrape). `gallery` must not wait (it runs on the event loop): None while the index is busy keeps the gauge as
        it was."""
        self._gallery, self._networks, self._body_held = gallery, providers, body_held
        self.refresh()

    def refresh(self) -> None:
        """Set the gauges that changed: the index (size or replay position: a timestamp for "mostrecent" says
        this worker's view is the newest) and the providers (a network loads on first use unless preloaded)."""
        self.body_bytes.set(self._body_held())
        stats = self._gallery()
        if stats is not None and stats != self._gallery_seen:
            self.gallery_faces.set(stats.size)
            self._gallery_seen = stats
        for network, provider in self._networks().items():
            now, before = provider or "not_loaded", self._providers_seen.get(network)
            if now == before:
                continue
            if before is not None:
                if self.shared is not None:
                    self.providers.labels(network, before).set(0)  # no removal of a series in multiprocess mode
                else:
                    self.providers.remove(network, before)
            self.providers.labels(network, now).set(1)
            self._providers_seen[network] = now

    def close(self) -> None:
        """At this worker's clean stop: its gauges and recent requests leave the shared figures."""
        if self.shared is not None:
            self.recent.close()
            forget_process(self.shared, os.getpid())

    def observe_batch(self, info: BatchInfo) -> None:
        """The pipeline's `on_batch` hook (inference threads): how much work each network call shared."""
        self.batch_items.labels(info.name, "true" if info.wide else "false").observe(info.items)
        self.batch_size.labels(info.name).observe(info.size)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).observe(seconds)
        self.recent.append(method, route, seconds)
        if self.shared is not None:
            # The request may have changed this worker's index (a search replays the change log) or loaded a
            # model, and no other process can ask this one at a scrape. (Alone, the scrape itself reads them.)
            self.refresh()

    def recent_latency(self) -> tuple[list[RouteLatency], int]:
        """p50/p95/max of the recent requests per route, most requested first (every running worker's: the
        `RECENT_WINDOW` latest of them all), and how many workers contributed."""
        requests, workers = self.recent.latest()
        by_route: dict[tuple[str, str], list[float]] = {}
        for method, route, seconds in requests:
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
        return sorted(rows, key=lambda r: (-r.count, r.route, r.method)), workers

    def observe_decision(self, endpoint: str, outcome: str, distance: float | None) -> None:
        self.decisions.labels(endpoint, outcome).inc()
        if distance is not None:
            self.distances.labels(endpoint).observe(distance)

    def render(self) -> bytes:
        self.refresh()
        if self.shared is None:
            return generate_latest(self.registry)
        forget_dead_processes(self.shared)  # uvicorn restarted a killed worker: its gauges go, its counts stay
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self.shared))  # type: ignore[no-untyped-call]  # untyped upstream
        return generate_latest(merged)
