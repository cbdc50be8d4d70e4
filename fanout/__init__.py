"""The `fanout` command: one entry point for every feed-fanout process and tool."""
