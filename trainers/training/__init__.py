"""Training a reward model: the loop, its recipe, LoRA, data-parallel ranks, data loading and resumable checkpoints."""
