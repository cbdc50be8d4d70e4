"""The gateway's Prometheus metrics (process-wide, served at /metrics on the ops port).
Under a supervisor (`workers.py`) the workers run prometheus-client's multiprocess mode:
counters add up over every worker (dead ones included), the subscriber gauge over the
live ones, the reader lag is the largest of the live workers'."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SUBSCRIBERS = Gauge("fanout_gateway_subscribers", "stream subscribers connected", multiprocess_mode="livesum")
SERVED = Counter("fanout_gateway_served_total", "streams opened")
EVENTS_SENT = Counter("fanout_gateway_events_sent_total", "feed events written to subscribers", ["feed"])
CATCHUPS = Counter(
    "fanout_gateway_catchups_total", "times a subscriber read history on its own (resume, earliest, slow)"
)
GAPS = Counter(
    "fanout_gateway_gaps_total", "`event: gap` sent (history that neither Redis nor Postgres holds)"
)
RESETS = Counter(
    "fanout_gateway_resets_total", "`event: reset` sent (a cursor from another epoch, or a v1 cursor)"
)
SLOW_DISCONNECTS = Counter(
    "fanout_gateway_slow_disconnects_total", "subscribers disconnected for staying too far behind"
)
OVERFLOWS = Counter(
    "fanout_gateway_buffer_overflows_total", "live subscribers whose buffer filled up (dropped to catch-up)"
)
READER_LAG = Gauge(
    "fanout_gateway_reader_lag_seconds",
    "age (since its broker time) of the last entry the shared reader dispatched, when it was dispatched",
    ["feed"],
    multiprocess_mode="livemax",
)
READER_RESTARTS = Counter(
    "fanout_gateway_reader_restarts_total",
    "times a feed's shared reader failed with an unexpected exception and was restarted",
    ["feed"],
)
REJECTED = Counter("fanout_gateway_rejected_total", "stream requests refused", ["status"])
