"""The ingestor: NATS JetStream -> one Redis stream per feed, each message exactly once."""
