"""The stream processors: ingest, labeler, scorer, router (with verifiers and retrieval)."""
