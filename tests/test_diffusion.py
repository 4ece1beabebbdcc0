"""Diffusion math against closed forms computed independently here in float64."""
import math

import numpy as np
import pytest
import torch

from gendd_fast.diffusion import (GaussianDiffusion, create_diffusion, get_named_beta_schedule,
                                  space_timesteps)
from helpers import rel_close


def abar_closed(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def test_cosine_schedule_matches_closed_form():
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    for t in [0, 1, 17, 500, 998, 999]:
        expect = min(1 - abar_closed((t + 1) / 1000) / abar_closed(t / 1000), 0.999)
        assert betas[t] == pytest.approx(expect, rel=1e-12)
    # abar_t = prod(1 - beta) equals abar((t+1)/T) / abar(0) wherever beta was not clipped
    ac = np.cumprod(1 - betas)
    for t in [0, 10, 300, 900]:
        assert ac[t] == pytest.approx(abar_closed((t + 1) / 1000) / abar_closed(0), rel=1e-9)
    assert betas[-1] == 0.999  # clipped


def test_linear_schedule_endpoints():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_named_beta_schedule("quadratic", 1000)


@pytest.mark.parametrize("spec,count,first,last", [
    ("100", 100, 0, 999), ("64", 64, 0, 999), ("1", 1, 0, 0), ("1000", 1000, 0, 999),
    ("ddim50", 50, 0, 980), ("ddim10", 10, 0, 900)])
def test_respacing_sets(spec, count, first, last):
    steps = sorted(space_timesteps(1000, spec))
    assert len(steps) == count and steps[0] == first and steps[-1] == last


def test_respacing_sections_and_ddim_stride():
    steps = sorted(space_timesteps(100, "10,5"))
    # first section [0, 50) with 10 steps at stride 49/9, second [50, 100) with 5 at 49/4
    assert steps[:10] == [round(i * 49 / 9) for i in range(10)]
    assert steps[10:] == [50 + round(i * 49 / 4) for i in range(5)]
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    # "100" is evenly spaced with fractional stride 999/99
    assert sorted(space_timesteps(1000, "100")) == [round(i * 999 / 99) for i in range(100)]


@pytest.mark.parametrize("bad,msg", [("abc", "unknown respacing"), ("ddimx", "unknown respacing"),
                                     ("2000", "cannot take"), ("ddim400", "integer stride"),
                                     ("0", "at least one")])
def test_respacing_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        space_timesteps(1000, bad)


def test_respaced_betas_recomputed_from_abar():
    base = get_named_beta_schedule("cosine", 1000)
    ac = np.cumprod(1 - base)
    diff = create_diffusion("10")
    kept = diff.timestep_map
    assert kept == sorted(space_timesteps(1000, "10"))
    prev = 1.0
    for j, k in enumerate(kept):
        assert diff.np["betas"][j] == pytest.approx(1 - ac[k] / prev, rel=1e-12)
        prev = ac[k]
    t = torch.tensor([0, 3, 9])
    assert diff.original_timesteps(t).tolist() == [kept[0], kept[3], kept[9]]


def _closed_form_loss(diff, out, x0, xt, t, eps):
    """Direct float64 computation of mse + vb for one batch (independent of the module)."""
    d = x0.shape[1]
    b = diff.np["betas"]
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = b * (1 - ac_prev) / (1 - ac)
    post_logvar_clip = np.log(np.append(post_var[1], post_var[1:]))
    res = []
    for n in range(x0.shape[0]):
        tt = int(t[n])
        e_hat, v = out[n, :d].double(), out[n, d:].double()
        x0n, xtn, en = x0[n].double(), xt[n].double(), eps[n].double()
        mse = ((en - e_hat) ** 2).mean()
        c1 = b[tt] * math.sqrt(ac_prev[tt]) / (1 - ac[tt])
        c2 = (1 - ac_prev[tt]) * math.sqrt(1 - b[tt]) / (1 - ac[tt])
        true_mean = c1 * x0n + c2 * xtn
        pred_x0 = math.sqrt(1 / ac[tt]) * xtn - math.sqrt(1 / ac[tt] - 1) * e_hat
        model_mean = c1 * pred_x0 + c2 * xtn
        f = (v + 1) / 2
        logvar = f * math.log(b[tt]) + (1 - f) * post_logvar_clip[tt]
        if tt > 0:
            var_q, var_p = math.exp(post_logvar_clip[tt]), torch.exp(logvar)
            kl = 0.5 * (torch.log(var_p / var_q) + (var_q + (true_mean - model_mean) ** 2) / var_p
                        - 1)
            vb = kl.mean() / math.log(2)
        else:
            def cdf(u):
                return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
            inv_s = torch.exp(-0.5 * logvar)
            c = x0n - model_mean
            hi, lo = cdf(inv_s * (c + 1 / 255)), cdf(inv_s * (c - 1 / 255))
            logp = torch.where(x0n < -0.999, torch.log(hi.clamp(min=1e-12)),
                               torch.where(x0n > 0.999, torch.log((1 - lo).clamp(min=1e-12)),
                                           torch.log((hi - lo).clamp(min=1e-12))))
            vb = -logp.mean() / math.log(2)
        res.append(mse + vb)
    return torch.stack(res)


def test_loss_decomposition_matches_direct_computation():
    diff = create_diffusion("")
    n, d = 12, 8
    x0 = torch.randn(n, d) * 0.5
    x0[0, :3] = torch.tensor([-1.0, 1.0, 0.9995])  # exercise the decoder's edge bins
    eps = torch.randn(n, d)
    t = torch.tensor([0, 0, 1, 2, 10, 100, 250, 500, 750, 998, 999, 0])
    out = torch.randn(n, 2 * d).clamp(-0.99, 0.99)
    xt = diff.q_sample(x0, t, eps)
    ac = torch.from_numpy(np.cumprod(1 - diff.np["betas"]))[t][:, None]
    torch.testing.assert_close(xt.double(), ac.sqrt() * x0 + (1 - ac).sqrt() * eps,
                               rtol=1e-5, atol=1e-6)
    got = diff.losses_from_output(out, x0, xt, t, eps)
    want = _closed_form_loss(diff, out, x0, xt, t, eps)
    torch.testing.assert_close(got["loss"].double(), want, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(got["mse"], ((eps - out[:, :d]) ** 2).mean(1))


def test_vb_term_trains_variance_only():
    diff = create_diffusion("")
    n, d = 6, 4
    x0, eps = torch.randn(n, d), torch.randn(n, d)
    t = torch.tensor([0, 5, 50, 400, 800, 999])
    out = torch.randn(n, 2 * d, requires_grad=True)
    xt = diff.q_sample(x0, t, eps)
    vb = diff.losses_from_output(out, x0, xt, t, eps)["vb"].sum()
    (g,) = torch.autograd.grad(vb, out)
    assert torch.all(g[:, :d] == 0) and torch.any(g[:, d:] != 0)
    mse = diff.losses_from_output(out, x0, xt, t, eps)["mse"].sum()
    (g,) = torch.autograd.grad(mse, out)
    assert torch.all(g[:, d:] == 0) and torch.any(g[:, :d] != 0)


def test_ancestral_two_step_sampler_by_hand():
    diff = create_diffusion("2")
    d = 3
    w = torch.randn(2 * d, d)

    def model(x, t, **_):  # a fixed linear "head" that depends on the original timestep
        return torch.tanh(x @ w.T + t[:, None].float() / 1000)

    xT, z = torch.randn(4, d), torch.randn(2, 4, d)
    got = diff.p_sample_loop(model, (4, d), noise=xT, step_noises=z, temperature=0.7)
    # by hand, float64
    b = diff.np["betas"]
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    pv = b * (1 - ac_prev) / (1 - ac)
    plog = np.log(np.append(pv[1], pv[1:]))
    x = xT.double()
    for step, i in enumerate([1, 0]):
        o = model(x.float(), torch.full((4,), diff.timestep_map[i])).double()
        e, v = o[:, :d], o[:, d:]
        x0 = math.sqrt(1 / ac[i]) * x - math.sqrt(1 / ac[i] - 1) * e
        mean = (b[i] * math.sqrt(ac_prev[i]) / (1 - ac[i]) * x0
                + (1 - ac_prev[i]) * math.sqrt(1 - b[i]) / (1 - ac[i]) * x)
        f = (v + 1) / 2
        logvar = f * math.log(b[i]) + (1 - f) * plog[i]
        x = mean + (torch.exp(0.5 * logvar) * z[step].double() * 0.7 if i > 0 else 0)
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_uses_no_noise():
    diff = create_diffusion("ddim10")
    w = torch.randn(8, 4)

    def model(x, t, **_):
        return torch.tanh(x @ w.T)

    xT = torch.randn(5, 4)
    a = diff.ddim_sample_loop(model, (5, 4), noise=xT, step_noises=torch.randn(10, 5, 4))
    b = diff.ddim_sample_loop(model, (5, 4), noise=xT, step_noises=torch.randn(10, 5, 4) * 9)
    torch.testing.assert_close(a, b)
    c = diff.ddim_sample_loop(model, (5, 4), noise=xT, eta=1.0, step_noises=torch.randn(10, 5, 4))
    assert not torch.allclose(a, c)


def test_step_noise_shape_is_checked():
    diff = create_diffusion("4")
    with pytest.raises(ValueError, match="step_noises has shape"):
        diff.p_sample_loop(lambda x, t: torch.zeros(x.shape[0], 6), (2, 3),
                           noise=torch.zeros(2, 3), step_noises=torch.zeros(3, 2, 3))


def test_bad_betas_rejected():
    with pytest.raises(ValueError):
        GaussianDiffusion(np.array([0.1, -0.2]))


def test_ddim_eta0_loop_matches_a_hand_computed_respaced_loop():
    """DDIM (eta 0) over 'ddim5' (kept steps 0, 200, ..., 800), by hand in float64: x0 from the
    predicted eps, then x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with the head
    called at the original timestep of each kept step. (Planted: calling the model with the
    respaced index 0..4 instead of the original timestep fails this test.)"""
    diff = create_diffusion("ddim5")
    betas = get_named_beta_schedule("cosine", 1000)
    abar_full = np.cumprod(1.0 - betas)
    kept = [0, 200, 400, 600, 800]
    torch.manual_seed(3)
    w = torch.randn(8, 4, dtype=torch.float64)

    def model(x, t, **_):
        return torch.tanh(x.double() @ w.T + t.double()[:, None] / 1000.0)

    xT = torch.randn(3, 4)
    got = diff.ddim_sample_loop(model, (3, 4), noise=xT, eta=0.0)
    x = xT.double()
    for k in reversed(range(5)):
        a = float(abar_full[kept[k]])
        a_prev = float(abar_full[kept[k - 1]]) if k > 0 else 1.0
        eps = model(x, torch.full((3,), kept[k]))[:, :4]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-5)
# Guards from the mutation run (moved from test_mutation_guards.py): each pins a behaviour the rest
# of the suite did not, with inputs where the wrong and right formulas disagree; each docstring
# names the planted bugs it was run against and failed on.


# ---------------------------------------------------------------------------------------------
# The ancestral sampler, with tolerances relative to each term's own scale
# ---------------------------------------------------------------------------------------------
def _by_hand(diff, model, xT, z, temperature):
    """The improved-DDPM ancestral loop in float64; returns the states after every step."""
    b = diff.np["betas"]
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    pv = b * (1 - ac_prev) / (1 - ac)
    plog = np.log(np.append(pv[1], pv[1:]))
    x, states, d = xT.double(), [], xT.shape[1]
    for step, i in enumerate(reversed(range(diff.num_timesteps))):
        o = model(x.float(), torch.full((x.shape[0],), diff.timestep_map[i])).double()
        e, v = o[:, :d], o[:, d:]
        x0 = math.sqrt(1 / ac[i]) * x - math.sqrt(1 / ac[i] - 1) * e
        mean = (b[i] * math.sqrt(ac_prev[i]) / (1 - ac[i]) * x0
                + (1 - ac_prev[i]) * math.sqrt(1 - b[i]) / (1 - ac[i]) * x)
        logvar = (v + 1) / 2 * math.log(b[i]) + (1 - (v + 1) / 2) * plog[i]
        x = mean + (torch.exp(0.5 * logvar) * z[step].double() * temperature if i > 0 else 0)
        states.append(x)
    return states


def _linear_head(d, seed):
    w = torch.randn(2 * d, d, generator=torch.Generator().manual_seed(seed))

    def model(x, t, **_):  # depends on the original timestep index, as the head does
        return torch.tanh(x @ w.T * 0.5 + t[:, None].float() / 1000)
    return model


def test_ancestral_sampler_by_hand_at_moderate_scale():
    """Steps {0, 500} ("1,1" respacing) keep every value O(1), so each element is compared to
    its own size. Planted: noise std exp(logvar); temperature ignored; noise on the last step;
    variance fraction (v + 1) / 2 flipped; model called with respaced instead of original t."""
    diff = create_diffusion("1,1")
    assert diff.timestep_map == [0, 500]
    d = 3
    model = _linear_head(d, 0)
    xT, z = torch.randn(6, d), torch.randn(2, 6, d)
    got = diff.p_sample_loop(model, (6, d), noise=xT, step_noises=z, temperature=0.7)
    want = _by_hand(diff, model, xT, z, 0.7)[-1]
    assert want.abs().max() < 20
    rel_close(got, want, 1e-4, "x_0")


def test_ancestral_sampler_noise_term_at_large_scale():
    """With steps {0, 999} the state after the first step is ~1e4, so an absolute-or-relative
    check on it hides an error of order 1 in the noise. Check the noise term on its own: two
    runs that differ only in the first step's noise differ by exactly
    temperature * exp(0.5 * logvar) * (z - z'). The last step's noise must not matter at all."""
    diff = create_diffusion("2")
    d = 3
    model = _linear_head(d, 1)
    xT = torch.randn(6, d)
    seen = []

    def recording(x, t, **kw):
        seen.append(x.clone())
        return model(x, t, **kw)

    z1, z2 = torch.randn(2, 6, d), torch.randn(2, 6, d)
    z2[1] = z1[1]
    a = diff.p_sample_loop(recording, (6, d), noise=xT, step_noises=z1, temperature=0.7)
    b = diff.p_sample_loop(recording, (6, d), noise=xT, step_noises=z2, temperature=0.7)
    x1a, x1b = seen[1].double(), seen[3].double()   # inputs to the second (last) step
    assert x1a.abs().max() > 1e3  # the scale that hid errors before
    states = _by_hand(diff, model, xT, z1, 0.7)
    rel_close(x1a, states[0], 1e-5, "x after the first step")
    # the noise term alone, relative to its own size
    b_, ac = diff.np["betas"][1], np.cumprod(1 - diff.np["betas"])
    pv = diff.np["posterior_variance"]
    out = model(xT, torch.full((6,), 999)).double()
    f = (out[:, d:] + 1) / 2
    logvar = f * math.log(b_) + (1 - f) * math.log(pv[1])
    want = 0.7 * torch.exp(0.5 * logvar) * (z1[0] - z2[0]).double()
    assert want.abs().min() > 1e-3
    got_diff = x1a - x1b
    # fp32 rounding of values ~1e4 is ~1e-3 absolute: compare each row to its own noise scale
    err = ((got_diff - want).abs() / want.abs().amax(1, keepdim=True)).max().item()
    assert err < 0.01, f"noise term relative error {err:.2e}"
    # no noise on the last step: changing only z[last] changes nothing
    z3 = z1.clone()
    z3[1] = torch.randn(6, d) * 5
    c = diff.p_sample_loop(model, (6, d), noise=xT, step_noises=z3, temperature=0.7)
    assert torch.equal(a, c)
    assert not torch.equal(a, b)
    assert ac[1] < 1e-3
