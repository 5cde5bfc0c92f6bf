"""Training: the data pipeline and the trainer's pieces (run under torchrun)."""
