"""Curation rules the worker applies around its stages: content de-duplication (exact and MinHash),
producer trust, decontamination, the review budget and the error-driven expansion's decision."""
