"""The ingestor's Prometheus metrics (registered once, in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("fanout_ingestor_messages_total", "messages appended to a feed's Redis stream", ["feed"])
DUPLICATES = Counter(
    "fanout_ingestor_duplicates_total", "redelivered messages already in Redis (not appended again)", ["feed"]
)
DEAD_LETTERS = Counter(
    "fanout_ingestor_dead_letters_total",
    "payloads that could not be decoded, appended at their seq as malformed entries",
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
REFILLED = Counter(
    "fanout_ingestor_refilled_total",
    "messages Redis had lost (a hole below a batch, or an emptied stream), read again from "
    "JetStream and appended at their seq",
    ["feed"],
)
REDIS_RESTARTS = Counter(
    "fanout_ingestor_redis_restarts_total",
    "times the writer found Redis's run_id changed on reconnecting (Redis restarted or failed "
    "over, and may have lost writes; the next append reports any hole)",
)
CONSUMER_PENDING = Gauge(
    "fanout_ingestor_consumer_pending_messages",
    "messages in JetStream not yet delivered to the ingestor's consumer (the backlog)",
    ["feed"],
)
CONSUMER_ACK_PENDING = Gauge(
    "fanout_ingestor_consumer_ack_pending_messages",
    "messages delivered to the ingestor and not yet acked",
    ["feed"],
)
