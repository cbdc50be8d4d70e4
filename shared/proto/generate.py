"""Regenerate the protobuf Python code from the specs beside this file.

    python -m shared.proto.generate          # rewrite the generated files
    python -m shared.proto.generate --check  # exit 1 if they are out of date

Needs the `dev` extra (grpcio-tools, which ships protoc).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
SPECS = ("event.proto", "execution.proto")


def generated_names() -> list[str]:
    return [f"{Path(s).stem}_pb2{ext}" for s in SPECS for ext in (".py", ".pyi")]


def generate(out_dir: Path) -> None:
    """Run protoc on the specs, writing `<spec>_pb2.py` and `.pyi` into out_dir."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *(str(PROTO_DIR / s) for s in SPECS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for name in generated_names():
        if not (out_dir / name).exists():
            raise RuntimeError(f"protoc did not write {name}")


def stale_files() -> list[str]:
    """The generated files that differ from what the specs produce now."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            name
            for name in generated_names()
            if (Path(tmp) / name).read_bytes() != _read(PROTO_DIR / name)
        ]


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.proto.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check, exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"out of date: shared/proto/{name}", file=sys.stderr)
        return 1 if stale else 0
    generate(PROTO_DIR)
    print("regenerated " + ", ".join(generated_names()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
