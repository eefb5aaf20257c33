"""Torch custom ops fronting the fused kernels: one family, the adapted linear (LoRA, IA3)."""

from . import ia3, linear  # noqa: F401  (registers the fastpeft:: ops)
