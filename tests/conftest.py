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
