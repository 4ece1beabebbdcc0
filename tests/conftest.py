import os

# Triton kernels run on CPU through the interpreter; it must be set before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN in tests, so an element a kernel fails to write is caught.
os.environ.setdefault("GENDD_FAST_POISON", "1")
# Two cores: keep torch from oversubscribing them when tests run in parallel with builds.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def perturb_zero_init(module, std=0.05, seed=1234):
    """Re-draw every parameter that is all zeros (adaLN, final layer): zeros would hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module
