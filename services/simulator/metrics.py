"""The simulator's Prometheus metrics (registered once, in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter

PUBLISHED = Counter("fanout_simulator_published_total", "payloads published on NATS", ["feed"])
MALFORMED = Counter(
    "fanout_simulator_malformed_total", "malformed payloads published on purpose, by kind", ["feed", "defect"]
)
FAILED = Counter(
    "fanout_simulator_publish_failures_total", "payloads NATS refused (lost, as upstream's are)", ["feed"]
)
