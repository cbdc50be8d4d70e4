"""The upstream wire format: `event.proto` and `execution.proto` and the code protoc
generates from them. Regenerate with `python -m shared.proto.generate`."""
