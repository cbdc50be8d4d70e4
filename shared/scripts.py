"""The Lua scripts in `shared/lua/`, read once and registered with a Redis client.

redis-py's Script calls EVALSHA and loads the script on NOSCRIPT (a restarted Redis),
also inside pipelines.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

LUA_DIR = Path(__file__).resolve().parent / "lua"


@cache
def source(name: str) -> str:
    """The text of `shared/lua/<name>.lua`."""
    return (LUA_DIR / f"{name}.lua").read_text()


def register(client: Redis, name: str) -> AsyncScript:
    return client.register_script(source(name))
