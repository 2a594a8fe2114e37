"""Pretraining loop: train state, optimiser, checkpoints and metrics."""
