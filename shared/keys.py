"""Every Redis key feed-fanout uses, built here and nowhere else.

Per feed (and for the dead letters), with the default prefix `fanout`:

    fanout:{execution}:stream        the stream of entries, entry id `<seq>-0` (XRANGE it by seq)
    fanout:{execution}:meta          hash: epoch, seq (top), first_seq, last_id
    fanout:{execution}:msg:<msg id>  dedup key: the entry id a message id was appended as
                                     (TTL FANOUT_DEDUP_TTL, the redelivery window)
    fanout:ticket:<digest>           an SSE gateway's single-use ticket (JSON, with a TTL),
                                     named by a digest of the ticket, never the ticket itself

The `{feed}` hash tag puts all of a feed's keys in one Redis Cluster slot, so a Lua
script touching the stream, the meta and the dedup keys runs unchanged on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "fanout"

    def _key(self, feed: str, kind: str) -> str:
        return f"{self.prefix}:{{{feed}}}:{kind}"

    def stream(self, feed: str) -> str:
        return self._key(feed, "stream")

    def meta(self, feed: str) -> str:
        return self._key(feed, "meta")

    def dedup(self, feed: str, message_id: str) -> str:
        return self._key(feed, f"msg:{message_id}")

    def ticket(self, digest: str) -> str:
        """A gateway ticket, shared by every gateway behind a load balancer."""
        return f"{self.prefix}:ticket:{digest}"
