"""The Lua scripts in `shared/lua/`, read once and registered with a Redis client.

redis-py's Script calls EVALSHA and loads the script on NOSCRIPT (a restarted Redis),
also inside pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from shared.keys import Keys

LUA_DIR = Path(__file__).resolve().parent / "lua"


@cache
def source(name: str) -> str:
    """The text of `shared/lua/<name>.lua`."""
    return (LUA_DIR / f"{name}.lua").read_text()


def register(client: Redis, name: str) -> AsyncScript:
    return client.register_script(source(name))


def ingest_append_call(
    keys: Keys,
    feed: str,
    epoch: str,
    messages: Sequence[tuple[int, str, Sequence[str]]],
    ttl: int,
    start: int = 0,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of one `ingest_append` call: `messages` are (seq, message id, entry
    fields without `seq`, as `codec.entry_fields` or `codec.malformed_fields` make them),
    in seq order. See the script's header for what it returns."""
    call_keys = [keys.stream(feed), keys.meta(feed)]
    args: list[str | int] = [ttl, epoch, start]
    for seq, message_id, fields in messages:
        call_keys.append(keys.dedup(feed, message_id))
        args += [seq, len(fields), *fields]
    return call_keys, args
