"""On the GPU at hand: the trainer's pre-flight check passes at the training shapes in every
dtype, and what it compiled is what a step then launches (no OutOfResources in the step)."""
import pytest
import torch

from gendd_fast import FusedDiffLoss
from gendd_fast.launch_check import fused_launch_problem


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_preflight_passes_and_the_step_runs(dtype):
    shapes = dict(width=1024, depth=3, token_dim=64, rows=[7680, 5120, 20480])
    assert fused_launch_problem(torch.device("cuda"), dtype, shapes) is None
    head = FusedDiffLoss(64, 256, 3, 1024, "64", 4).cuda()
    target = torch.randn(64, 4 * 64, device="cuda")
    z = torch.randn(64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        loss = head.distill_loss(target, z, 30, 0.2)  # 7,680 rows
    loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
