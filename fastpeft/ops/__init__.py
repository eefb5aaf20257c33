"""Torch custom ops fronting the fused kernels: two families: the adapted linear (LoRA, IA3) and prefix attention."""

from . import ia3, linear, prefix  # noqa: F401  (registers the fastpeft:: ops)
