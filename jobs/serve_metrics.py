"""`serve`'s GET /metrics in the Prometheus text format (prometheus_client, one registry per server).

Series:
- ``xmodal_serve_requests_total{endpoint, code}``: answered requests;
- ``xmodal_serve_request_errors_total{endpoint, code}``: those answered with a 4xx or 5xx;
- ``xmodal_serve_request_duration_seconds{endpoint}``: histogram, first byte to answer;
- ``xmodal_serve_media_queries{state}``: media queries decoding or waiting for a worker (``admitted``);
- ``xmodal_serve_media_rejected_total`` / ``xmodal_serve_media_killed_total``: media queries refused
  with 503, and decode workers killed because a request ran out of time;
- ``xmodal_serve_connections``: open connections;
- ``xmodal_index_version_info{index, version, model_id}`` 1 for the served version, and
  ``xmodal_index_vectors`` its vector count (both absent while nothing is served).

``endpoint`` is one of the service's paths, or ``other`` (unknown paths never grow the label set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xmodal_index.sinks.serving.hot_swap import HandleStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _LiveState(Collector):
    """Gauges read when scraped: the served version, open connections, the media queue."""

    def __init__(self, status: Callable[[], HandleStatus], connections: Callable[[], int],
                 media: Callable[[], tuple[int, int, int]]) -> None:
        self._status = status
        self._connections = connections
        self._media = media

    def collect(self) -> Iterable[Metric]:
        st = self._status()
        info = GaugeMetricFamily("xmodal_index_version_info", "The index version being served (value 1)",
                                 labels=["index", "version", "model_id"])
        vectors = GaugeMetricFamily("xmodal_index_vectors", "Vectors in the served index version")
        if st.version is not None:
            info.add_metric([st.index_root, st.version, st.model_id or ""], 1.0)
            vectors.add_metric([], float(st.ntotal or 0))
        yield info
        yield vectors
        yield GaugeMetricFamily("xmodal_serve_connections", "Open client connections", value=self._connections())
        admitted, rejected, killed = self._media()
        yield GaugeMetricFamily("xmodal_serve_media_queries", "Media queries decoding or waiting for a worker",
                                value=admitted)
        yield CounterMetricFamily("xmodal_serve_media_rejected", "Media queries refused with 503 (queue full)",
                                  value=rejected)
        yield CounterMetricFamily("xmodal_serve_media_killed", "Decode workers killed at a request's deadline",
                                  value=killed)


class ServeMetrics:
    """Counters and the latency histogram of one server, and their text exposition."""

    def __init__(self, endpoints: Iterable[str], status: Callable[[], HandleStatus], connections: Callable[[], int],
                 media: Callable[[], tuple[int, int, int]]) -> None:
        self.endpoints = frozenset(endpoints)
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter("xmodal_serve_requests", "Requests answered, by endpoint and status code",
                                 ["endpoint", "code"], registry=self.registry)
        self._errors = Counter("xmodal_serve_request_errors", "Requests answered with a 4xx or 5xx status",
                               ["endpoint", "code"], registry=self.registry)
        self._latency = Histogram("xmodal_serve_request_duration_seconds",
                                  "Seconds from a request's first byte to its answer", ["endpoint"],
                                  buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.registry.register(_LiveState(status, connections, media))

    def endpoint(self, path: str) -> str:
        return path if path in self.endpoints else "other"

    def observe(self, path: str, code: int, seconds: float) -> None:
        endpoint = self.endpoint(path)
        self._requests.labels(endpoint, str(code)).inc()
        if code >= 400:
            self._errors.labels(endpoint, str(code)).inc()
        self._latency.labels(endpoint).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
