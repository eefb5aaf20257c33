"""Torch custom ops fronting the fused kernels."""
