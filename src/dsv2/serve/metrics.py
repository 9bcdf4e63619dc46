"""Prometheus metrics of one server (its own registry: two servers in one process do not mix).

Counters and histograms are fed by the engine loop thread as requests progress; the gauges are set by
it after every engine iteration (the engine is only ever touched from that thread).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Every metric `/metrics` exports (names prefixed `dsv2_`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dsv2_requests", "Finished engine requests by status "
                                "(stop | length | abort | error)", ["status"], registry=r)
        self.rejected = Counter("dsv2_rejected_requests", "HTTP requests answered with an error, by status code",
                                ["code"], registry=r)
        self.prompt_tokens = Counter("dsv2_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("dsv2_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("dsv2_requests_running", "Requests in the engine's running set", registry=r)
        self.waiting = Gauge("dsv2_requests_waiting", "Requests queued for admission", registry=r)
        self.preempted = Counter("dsv2_requests_preempted", "Preemptions: running requests sent back to the "
                                 "queue (blocks freed, recomputed later) when the cache ran out", registry=r)
        self._preempted_seen = 0
        self.blocks_used = Gauge("dsv2_cache_blocks_used", "KV cache blocks held by requests", registry=r)
        self.blocks_free = Gauge("dsv2_cache_blocks_free", "Free KV cache blocks", registry=r)
        self.blocks_total = Gauge("dsv2_cache_blocks_total", "KV cache blocks in all", registry=r)
        self.blocks_cached = Gauge("dsv2_cache_blocks_cached", "Blocks holding a prefix-cache entry (in use or "
                                   "evictable; evictable ones count as free)", registry=r)
        self.prefix_hit_rate = Gauge("dsv2_prefix_cache_hit_rate", "Fraction of looked-up full prompt blocks "
                                     "found in the prefix cache", registry=r)
        self.ttft = Histogram("dsv2_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv2_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dsv2_e2e_request_latency_seconds", "Arrival to last token", buckets=E2E_BUCKETS,
                             registry=r)

    def set_engine_state(self, running: int, waiting: int, report: dict, stats: object) -> None:
        """Gauges from one look at the engine: `cache_report()` and `stats` (called on the loop thread)."""
        self.running.set(running)
        self.waiting.set(waiting)
        total, free = int(report.get("num_blocks", 0)), int(report.get("free_blocks", 0))
        self.blocks_total.set(total)
        self.blocks_free.set(free)
        self.blocks_used.set(total - free)
        self.blocks_cached.set(int(report.get("cached_blocks", 0)))
        self.prefix_hit_rate.set(float(getattr(stats, "prefix_hit_rate", 0.0) or 0.0))
        preempted = int(getattr(stats, "preemptions", 0) or 0)
        if preempted > self._preempted_seen:
            self.preempted.inc(preempted - self._preempted_seen)
            self._preempted_seen = preempted

    def render(self) -> bytes:
        return generate_latest(self.registry)
