"""The human review loop: Redis work queue, annotator web app, aggregator."""
