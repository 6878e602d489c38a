"""The stream runtime: the worker and its processors, the shard writer, the retrain controller and its job launcher."""
