"""The ingestor's Prometheus metrics (registered once, in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("fanout_ingestor_messages_total", "messages appended to a feed's Redis stream", ["feed"])
DUPLICATES = Counter(
    "fanout_ingestor_duplicates_total", "redelivered messages already in Redis (not appended again)", ["feed"]
)
DEAD_LETTERS = Counter(
    "fanout_ingestor_dead_letters_total",
    "messages that could not be ingested, sent to the dead-letter stream",
    ["feed", "reason"],
)
REDELIVERED = Counter(
    "fanout_ingestor_redelivered_total", "messages JetStream delivered more than once (delivery count > 1)"
)
BATCH_SECONDS = Histogram(
    "fanout_ingestor_batch_seconds",
    "time to write one batch to Redis and ack it",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
OUTAGES = Counter(
    "fanout_ingestor_outages_total",
    "times NATS or Redis became unreachable and the ingestor backed off",
    ["server"],
)
REPLAYED = Counter(
    "fanout_ingestor_replayed_total",
    "messages Redis had lost after they were acked, appended again from JetStream",
)
REDIS_CHECKS = Counter(
    "fanout_ingestor_redis_checks_total",
    "checks of Redis against JetStream (at start, after a reconnect): replayed, or skipped "
    "because Redis had not restarted since the last completed check (same run_id)",
    ["result"],
)
CONSUMER_PENDING = Gauge(
    "fanout_ingestor_consumer_pending_messages",
    "messages in JetStream not yet delivered to the ingestor's consumer (the backlog)",
)
CONSUMER_ACK_PENDING = Gauge(
    "fanout_ingestor_consumer_ack_pending_messages",
    "messages delivered to the ingestor and not yet acked",
)
