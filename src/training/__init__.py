"""Training: precision, strategy, the training loop and callbacks."""
