"""FusedDiffLoss on the GPU at the real shapes (width 1024, 64-dim tokens) against the fp32
reference (TF32 off). Tolerances, relative to the largest reference value:
fp32 kernels: loss 1e-4, gradients 2e-3; fp16: loss 1e-2, gradients 3e-2; bf16: loss 2e-2,
gradients 6e-2 (one rounding of every operand to 8 bits of mantissa, fp32 accumulation)."""
import pytest
import torch

from gendd_fast import DiffLoss, FusedDiffLoss
from helpers import perturb_zero_init

SHAPES = {"cifar": dict(B=16, L=4, mul=30, z=256), "r50": dict(B=4, L=32, mul=10, z=2048)}
TOL = {torch.float32: (1e-4, 2e-3), torch.float16: (1e-2, 3e-2),
       torch.bfloat16: (2e-2, 6e-2)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_matches_fp32_reference(shape, dtype):
    s = SHAPES[shape]
    ref = perturb_zero_init(DiffLoss(64, s["z"], 3, 1024, "64", s["L"]), std=0.02).cuda()
    fus = FusedDiffLoss(64, s["z"], 3, 1024, "64", s["L"]).cuda()
    fus.load_state_dict(ref.state_dict())
    target = torch.randn(s["B"], s["L"] * 64, device="cuda")
    z = torch.randn(s["B"], s["z"], device="cuda")
    z_r, z_f = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    gen = lambda: torch.Generator(device="cuda").manual_seed(5)  # noqa: E731
    lr = ref.distill_loss(target, z_r, s["mul"], 0.2, generator=gen())
    if dtype == torch.float32:
        lf = fus.distill_loss(target, z_f, s["mul"], 0.2, generator=gen())
    else:
        with torch.autocast("cuda", dtype=dtype):
            lf = fus.distill_loss(target, z_f, s["mul"], 0.2, generator=gen())
    tl, tg = TOL[dtype]
    assert abs(lf.item() - lr.item()) <= tl * abs(lr.item()), (lf.item(), lr.item())
    lr.backward()
    lf.backward()
    for (name, p), (_, q) in zip(ref.named_parameters(), fus.named_parameters()):
        err = ((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
        assert err <= tg, f"{name}: {err:.2e}"
    err = ((z_r.grad - z_f.grad).abs().max() / z_r.grad.abs().max()).item()
    assert err <= tg, f"z: {err:.2e}"


def test_trainer_step_on_gpu_with_fused_head_bf16_channels_last(tmp_path):
    from gendd_fast.train import train
    from helpers import save_teacher, tiny_config
    teacher, _ = save_teacher(tmp_path)
    cfg = tiny_config(tmp_path, "gendd", teacher, device="cuda", head="fused", amp="bf16",
                      channels_last=True, epochs=2, diffloss_w=256, sample_eval="end")
    res = train(cfg)
    assert 0 <= res["sample_top1"] <= 100
