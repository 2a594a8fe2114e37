"""PyTorch modules with the public VIS-MAE parameter names, and downstream fine-tuning."""
