"""The archiver's Prometheus metrics (served at /metrics by the ops server)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROWS = Counter("fanout_archiver_rows_total", "Rows stored in the catalogue", ["feed"])
MALFORMED = Counter(
    "fanout_archiver_malformed_total",
    "Malformed entries (payloads the ingestor could not decode) stored in the dead_letter table",
    ["feed"],
)
DUPLICATES = Counter(
    "fanout_archiver_duplicates_total",
    "Redelivered entries already in the catalogue (conflicts skipped)",
    ["feed"],
)
DEAD_LETTERS = Counter(
    "fanout_archiver_dead_letters_total",
    "Entries the archiver could not store, moved to the dead_letter table",
)
BATCH_SECONDS = Histogram(
    "fanout_archiver_batch_seconds",
    "Time to store and acknowledge one batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LAG_ENTRIES = Gauge(
    "fanout_archiver_lag_entries", "Stream entries not yet archived (undelivered + pending)", ["feed"]
)
LAG_SECONDS = Gauge(
    "fanout_archiver_lag_seconds",
    "Age of the oldest entry not yet archived, by its broker_time (0 if none)",
    ["feed"],
)
TRIMMED = Counter("fanout_archiver_trimmed_total", "Archived stream entries trimmed from Redis", ["feed"])
ERRORS = Counter("fanout_archiver_errors_total", "Failed attempts against a server, retried", ["server"])
