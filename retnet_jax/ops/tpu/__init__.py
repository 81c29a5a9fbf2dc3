"""TPU kernels."""
