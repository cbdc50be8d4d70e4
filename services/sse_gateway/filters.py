"""Subscription filters: `?symbol=` and `?market=` for executions, `?sport=` for sport events.

Repeatable (`?symbol=AAPL&symbol=MSFT`: either). An event a filter rejects still moves the
cursor: it is sent as an `id:`-only frame, so resuming a filtered subscription is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.feeds import EXECUTION, SPORT_EVENT
from shared.proto import event_pb2

# query parameter -> (feed, entry field)
PARAMETERS: dict[str, tuple[str, str]] = {
    "symbol": (EXECUTION.name, "symbol"),
    "market": (EXECUTION.name, "market"),
    "sport": (SPORT_EVENT.name, "sport"),
}
SPORTS = tuple(event_pb2.sport.keys())
MAX_VALUE = 64


class FilterError(ValueError):
    """A filter that cannot be applied; the message says why."""


@dataclass(frozen=True, slots=True)
class Filters:
    """Per feed, the accepted values of some fields; empty: everything passes."""

    by_feed: tuple[tuple[str, tuple[tuple[str, frozenset[str]], ...]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.by_feed)

    def for_feed(self, feed: str) -> tuple[tuple[str, frozenset[str]], ...]:
        for name, rules in self.by_feed:
            if name == feed:
                return rules
        return ()

    def matches(self, feed: str, fields: Mapping[str, Any]) -> bool:
        for name, rules in self.by_feed:
            if name == feed:
                return all(str(fields.get(field)) in values for field, values in rules)
        return True


NO_FILTERS = Filters()


def parse(params: Iterable[tuple[str, str]], feeds: Iterable[str]) -> Filters:
    """Filters from the query's (name, value) pairs. Raises FilterError for a bad value or
    a filter on a feed the subscription does not include."""
    subscribed = set(feeds)
    rules: dict[str, dict[str, set[str]]] = {}
    for key, raw in params:
        if key not in PARAMETERS:
            continue
        feed, field = PARAMETERS[key]
        if feed not in subscribed:
            raise FilterError(f"`{key}` filters the {feed} feed, which this subscription does not include")
        value = raw.strip()
        if not value or len(value) > MAX_VALUE or not value.isprintable():
            raise FilterError(
                f"bad `{key}` value {raw[:80]!r}: expected 1 to {MAX_VALUE} printable characters"
            )
        if key == "sport":
            value = value.upper()
            if value not in SPORTS:
                raise FilterError(f"unknown sport {raw[:80]!r}; known sports: {', '.join(SPORTS)}")
        rules.setdefault(feed, {}).setdefault(field, set()).add(value)
    return Filters(
        tuple(
            (feed, tuple((field, frozenset(values)) for field, values in sorted(fields.items())))
            for feed, fields in sorted(rules.items())
        )
    )
