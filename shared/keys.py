"""Every Redis key feed-fanout uses, built here and nowhere else.

Per feed (and for the dead letters), with the default prefix `fanout`:

    fanout:{execution}:stream        the stream of entries, entry id `<seq>-0` (XRANGE it by seq)
    fanout:{execution}:meta          hash: epoch, seq (top), first_seq, last_id
    fanout:{execution}:seen:<epoch>:<seq // 128>
                                     dedup hash of a block of 128 seqs: message id -> the
                                     entry id it was appended as (HSETNX; the hash's TTL,
                                     FANOUT_DEDUP_TTL, the redelivery window, is renewed
                                     at each write). Small hashes are listpacks: ~30 bytes
                                     a message instead of ~160 for a key of its own.
    fanout:ticket:<digest>           an SSE gateway's single-use ticket (JSON, with a TTL),
                                     named by a digest of the ticket, never the ticket itself

The `{feed}` hash tag puts all of a feed's keys in one Redis Cluster slot, so a Lua
script touching the stream, the meta and the dedup keys runs unchanged on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

# Seqs per dedup hash: at most Redis's hash-max-listpack-entries (128 by default), so
# each hash stays a compact listpack.
DEDUP_BLOCK = 128


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
        """The dedup hash holding `message_id` (`<epoch>.<seq>`): one per block of
        DEDUP_BLOCK seqs of an epoch, the message id its field."""
        epoch, _, seq = message_id.rpartition(".")
        block = int(seq) // DEDUP_BLOCK if seq.isascii() and seq.isdigit() else seq
        return self._key(feed, f"seen:{epoch}:{block}")

    def ticket(self, digest: str) -> str:
        """A gateway ticket, shared by every gateway behind a load balancer."""
        return f"{self.prefix}:ticket:{digest}"
