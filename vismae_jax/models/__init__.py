"""Flax linen modules of the Swin masked autoencoder."""
