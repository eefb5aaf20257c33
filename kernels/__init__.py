"""Triton kernels and their host launchers. Installed as ``fastpeft.kernels``; no HF imports here."""
