"""Conversion between Flax parameters and PyTorch state dicts."""
