"""The reward model and scoring: the model and its backends, input formatting, devices, precision, overlapped batches."""
