"""GPU tests: run on a CUDA machine with `python -m pytest -q tests_gpu` (not part of CPU CI)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))


@pytest.fixture(autouse=True)
def _cuda():
    assert torch.cuda.is_available(), "tests_gpu needs a CUDA device"
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
