"""The retrieval index of similar pairs and its copy in Redis."""
