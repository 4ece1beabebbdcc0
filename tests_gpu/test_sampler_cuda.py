"""The CUDA build of gendd_fast._C against its CPU result; the CUDA-graph replay.
Tolerances relative to the largest value: fp32 1e-4; bf16 weights 3e-2."""
import copy

import torch

from gendd_fast import DiffLoss, sampler_ext
from helpers import perturb_zero_init


def setup(steps=64, L=8, zc=512, width=1024, rows=256):
    h = perturb_zero_init(DiffLoss(64, zc, 3, width, str(steps), L), std=0.02).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(rows, zc, generator=g)
    k = torch.arange(L).repeat(rows // L)
    x_T = torch.randn(rows, 64, generator=g)
    noises = torch.randn(steps, rows, 64, generator=g)
    return h, z, k, x_T, noises


def rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).abs().max() / b.abs().max()).item()


def test_extension_was_built_with_cuda():
    assert sampler_ext.load_extension().with_cuda


def test_cuda_matches_cpu_fp32_and_bf16():
    h, z, k, x_T, noises = setup()
    for ddim, cfg in ((False, 2.0), (True, 1.0), (False, 1.0)):
        cpu = sampler_ext.sample(h, z, k, x_T, noises, cfg=cfg, ddim=ddim, eta=0.5)
        hc = copy.deepcopy(h).cuda()
        gpu = sampler_ext.sample(hc, z.cuda(), k.cuda(), x_T.cuda(), noises.cuda(), cfg=cfg,
                                 ddim=ddim, eta=0.5)
        assert rel(gpu, cpu) < 1e-4
        hb = copy.deepcopy(h).cuda().to(torch.bfloat16)
        gb = sampler_ext.sample(hb, z.cuda(), k.cuda(), x_T.cuda(), noises.cuda(), cfg=cfg,
                                ddim=ddim, eta=0.5)
        assert rel(gb, cpu) < 3e-2


def test_cuda_graph_replays_the_loop():
    h, z, k, x_T, noises = setup(steps=16)
    hc = h.cuda()
    graphed = sampler_ext.GraphedSampler(hc, z.shape[0], cfg=2.0)
    a = graphed(z.cuda(), k.cuda(), x_T.cuda(), noises.cuda())
    b = sampler_ext.sample(hc, z.cuda(), k.cuda(), x_T.cuda(), noises.cuda(), cfg=2.0)
    assert rel(a, b) < 1e-6
    c = graphed(z.cuda() * 0.5, k.cuda(), x_T.cuda(), noises.cuda())  # new inputs, same graph
    d = sampler_ext.sample(hc, z.cuda() * 0.5, k.cuda(), x_T.cuda(), noises.cuda(), cfg=2.0)
    assert rel(c, d) < 1e-6 and rel(c, a) > 1e-3
