"""Storage: the model store (a directory or S3) and the training shards (local or S3)."""
