"""Code shared by every feed-fanout service: the contracts (feeds, codec, keys, Lua
scripts) and the plumbing (settings, logging, metrics, lifecycle)."""
