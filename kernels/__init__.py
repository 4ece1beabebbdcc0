"""Triton kernels of the fused GenDD head (imported as ``gendd_fast.kernels``)."""
