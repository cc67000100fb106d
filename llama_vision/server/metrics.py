"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own so that several apps in
one process (tests) do not share counters.

Counters and histograms are updated by the routes; the engine's state (running rows, waiting requests,
reserved cache tokens, prefix cache bytes) is read from `engine.stats()` at each scrape, so it is never
stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for key, name, text in [
            ("running", "llama_vision_running_requests", "requests holding a cache row (decoding)"),
            ("waiting", "llama_vision_waiting_requests", "requests queued for a row"),
            (
                "reserved_tokens",
                "llama_vision_reserved_cache_tokens",
                "cache tokens reserved by running requests",
            ),
            ("prefix_cache_bytes", "llama_vision_prefix_cache_bytes", "bytes held by the prefix cache"),
        ]:
            yield GaugeMetricFamily(name, text, value=stats[key])


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llama_vision_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "llama_vision_prompt_tokens", "prompt tokens of finished requests", registry=r
        )
        self.image_tokens = Counter(
            "llama_vision_image_tokens", "image tokens (cross-attention) of finished requests", registry=r
        )
        self.completion_tokens = Counter("llama_vision_completion_tokens", "tokens generated", registry=r)
        self.finished = Counter(
            "llama_vision_finished_choices", "choices by finish reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "llama_vision_time_to_first_token_seconds",
            "arrival to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "llama_vision_time_per_output_token_seconds",
            "between tokens after the first",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "llama_vision_request_duration_seconds",
            "arrival to last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(stats))
