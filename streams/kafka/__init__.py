"""Kafka plumbing: client configuration, admin and the topic table, model announcements, the topic reader."""
