"""`fanout <command> [flags]`: runs one service or tool.

Each command lives in its own module, imported only when that command runs, which
provides `DESCRIPTION`, `configure_parser(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata
from types import ModuleType

from shared.settings import SettingsError

COMMANDS: dict[str, tuple[str, str]] = {
    "feeds": ("services.simulator.__main__", "publish simulated upstream feeds to NATS"),
    "ingest": ("services.ingestor.__main__", "NATS JetStream -> Redis streams, each message once"),
    "archive": ("services.archiver.__main__", "Redis streams -> PostgreSQL catalogue, each message once"),
    "gateway": ("services.sse_gateway.__main__", "serve the feeds to subscribers over Server-Sent Events"),
    "status": ("fanout.status", "print the state of every feed across NATS, Redis and PostgreSQL"),
    "up": ("fanout.up", "run the whole pipeline in the foreground"),
    "audit": ("fanout.audit", "reconcile JetStream, Redis and PostgreSQL; exit 1 on any discrepancy"),
}


def _module(command: str) -> ModuleType:
    return importlib.import_module(COMMANDS[command][0])


def version() -> str:
    """The installed distribution's version (pyproject.toml's)."""
    try:
        return metadata.version("feed-fanout")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fanout",
        description="feed-fanout: NATS feeds catalogued in PostgreSQL and served live over SSE.",
        epilog="Every flag also reads an environment variable; `fanout COMMAND --help` lists them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, summary) in COMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=summary)
            continue
        module = _module(name)
        cmd = sub.add_parser(name, help=summary, description=module.DESCRIPTION,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure_parser(cmd)
    args = parser.parse_args(argv)
    module = _module(args.command)
    try:
        return int(module.run(args))
    except SettingsError as exc:
        print(f"fanout {args.command}: bad setting: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
