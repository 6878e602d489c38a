"""The embedded runtime: a Kafka-compatible broker (Tansu) and Redis as local child processes."""
