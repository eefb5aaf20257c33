"""Torch custom ops fronting the fused kernels: the adapted linear (LoRA, IA3), prefix attention, soft prompts."""

from . import ia3, linear, prefix, soft_prompt  # noqa: F401  (registers the fastpeft:: ops)
