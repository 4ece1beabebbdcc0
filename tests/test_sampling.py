"""Sampling rules, for both backends (the reference Python loop and the compiled extension):
classifier-free guidance shares one noise between its halves, and each (step, row) noise is used
at that step for that row only."""
import pytest
import torch

from gendd_fast import DiffLoss, guided_sample, sampler_ext
from helpers import perturb_zero_init

STEPS, D, ZC = 5, 8, 12


def _head():
    torch.manual_seed(0)
    return perturb_zero_init(DiffLoss(D, ZC, 1, 32, str(STEPS), 2), std=0.2).eval()


def test_cfg_halves_start_from_and_step_with_the_same_noise(monkeypatch):
    """With guidance the batch is [cond; uncond]: both halves start from the same x_T and every
    head call sees the same x_t in both halves, so the guided eps mixes two predictions for one
    and the same point. A seeded run then gives the extension's tokens (which draws x_T for the
    conditional rows only).
    Planted: the unconditional half's x_T drawn as fresh noise -> fails."""
    head = _head()
    z, k = torch.randn(3, ZC), torch.tensor([0, 1, 1])
    guided_in, net_in = [], []
    real_cfg, real_fwd = head.net.forward_with_cfg, head.net.forward

    def cfg_spy(x, t, c, chunk_idx, cfg_scale):
        guided_in.append(x.clone())
        return real_cfg(x, t, c, chunk_idx, cfg_scale)

    def fwd_spy(x, t, c, chunk_idx):
        net_in.append(x.clone())
        return real_fwd(x, t, c, chunk_idx)

    monkeypatch.setattr(head.net, "forward_with_cfg", cfg_spy)
    monkeypatch.setattr(head.net, "forward", fwd_spy)
    a = guided_sample(head, z, k, cfg=2.0, generator=torch.Generator().manual_seed(4),
                      backend="torch")
    assert len(guided_in) == len(net_in) == STEPS
    assert torch.equal(guided_in[0][:3], guided_in[0][3:])          # one x_T for both halves
    for x in net_in:
        assert torch.equal(x[:3], x[3:])                             # one x_t at every step
    monkeypatch.undo()
    b = guided_sample(head, z, k, cfg=2.0, generator=torch.Generator().manual_seed(4),
                      backend="ext")
    torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_step_noise_i_r_moves_row_r_only_and_the_last_step_adds_none(backend, cfg):
    """step_noises[i, r] is the noise of step i (0: the step from T) for row r: changing it
    changes row r's token and no other, changing the last step's entry changes nothing (no
    noise at the last step), and with guidance the unconditional half's noises are never used.
    Planted: per-step noise sliced on the wrong axis (the reference loop taking
    ``step_noises[:, step]``; the extension path handed the noises transposed) -> fails."""
    assert sampler_ext.available()
    head = _head()
    n = STEPS   # as many rows as steps: a transposed slice keeps its shape and must be caught
    z, k = torch.randn(n, ZC), torch.tensor([0, 1, 0, 1, 1])
    rows = 2 * n if cfg != 1.0 else n
    zz = torch.cat([z, torch.zeros_like(z)]) if cfg != 1.0 else z
    kk = torch.cat([k, k]) if cfg != 1.0 else k
    g = torch.Generator().manual_seed(2)
    x_half = torch.randn(n, D, generator=g)
    x_T = torch.cat([x_half, x_half]) if cfg != 1.0 else x_half
    base_noise = torch.randn(STEPS, rows, D, generator=g)

    def run(step_noises):
        return head.sample(zz, kk, cfg=cfg, noise=x_T, step_noises=step_noises,
                           backend=backend)[:n]

    base = run(base_noise)
    for i, r in ((0, 2), (1, 0), (STEPS - 2, 4)):
        moved = base_noise.clone()
        moved[i, r] += 3.0
        out = run(moved)
        changed = [int(j) for j in torch.nonzero((out - base).abs().amax(1) > 1e-6).flatten()]
        assert changed == [r], (i, r, changed)
    last = base_noise.clone()
    last[STEPS - 1] += 3.0
    torch.testing.assert_close(run(last), base, rtol=0, atol=0)
    if cfg != 1.0:
        uncond = base_noise.clone()
        uncond[:, n:] += 3.0
        torch.testing.assert_close(run(uncond), base, rtol=0, atol=1e-6)
