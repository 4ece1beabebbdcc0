"""Triton kernels of the fused GenDD head (imported as ``gendd_fast.kernels``).

One op per module, each with its ``torch.autograd.Function`` and a plain PyTorch reference
beside it: noise injection, timestep features, the AdaLN condition gather, the adaLN
modulation GEMMs, the residual AdaLN block, the final layer, the diffusion loss; all GEMMs go
through :mod:`.matmul`, one kernel with the prologues and epilogues the head needs.
Importing this package needs Triton; :func:`unavailable_reason` says whether kernels can run.
"""
from .utils import HAS_TRITON, interpreting, unavailable_reason

__all__ = ["HAS_TRITON", "interpreting", "unavailable_reason"]
