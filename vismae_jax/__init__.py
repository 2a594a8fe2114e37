"""VIS-MAE pretraining in JAX/Flax, with export to PyTorch for downstream tasks."""
