"""Token sampling for a trained head: the reference Python loop and dispatch to the extension.

Conventions (MAR/GenDD): with ``cfg != 1`` the head samples a doubled batch ``[cond; uncond]``
whose halves share x_t; the first half is the guided result. ``guided_sample`` builds that batch
from the conditional ``z`` alone (unconditional rows have ``z = 0``, as in training's condition
dropout) and returns one token per input row.
"""
from __future__ import annotations

import functools

import torch

_BACKENDS = ("auto", "torch", "ext")
_SAMPLERS = ("ddpm", "ddim")


def _draw_noises(num_steps, shape, generator, device):
    """x_T and the per-step noises, drawn in the order the reference loop draws them."""
    x_T = torch.randn(shape, generator=generator, device=device)
    steps = torch.stack([torch.randn(shape, generator=generator, device=device)
                         for _ in range(num_steps)])
    return x_T, steps


def reference_sample(head, z, chunk_idx, temperature=1.0, cfg=1.0, noise=None, generator=None,
                     step_noises=None, sampler="ddpm", eta=0.0):
    """The reference: one Python-level head call per respaced step (twice the rows with CFG)."""
    diffusion = head.gen_diffusion
    n, d = z.shape[0], head.in_channels
    if cfg != 1.0:
        if n % 2:
            raise ValueError("with cfg != 1, z must be the doubled batch [cond; uncond] "
                             f"(an even number of rows); got {n} rows")
        if noise is None:
            half = torch.randn((n // 2, d), generator=generator, device=z.device)
            noise = torch.cat([half, half], dim=0)
        model = functools.partial(head.net.forward_with_cfg, cfg_scale=cfg)
    else:
        model = head.net.forward
    kwargs = dict(c=z, chunk_idx=chunk_idx)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model, (n, d), noise=noise, model_kwargs=kwargs,
                                       temperature=temperature, generator=generator,
                                       step_noises=step_noises, device=z.device)
    return diffusion.ddim_sample_loop(model, (n, d), noise=noise, model_kwargs=kwargs, eta=eta,
                                      temperature=temperature, generator=generator,
                                      step_noises=step_noises, device=z.device)


def _ext_can_run(z, chunk_idx, cfg):
    """The extension samples CFG with z_uncond = 0 and shared chunk indices; check that holds."""
    if cfg == 1.0:
        return True
    n = z.shape[0]
    if n % 2:
        return False
    return bool((z[n // 2:] == 0).all()) and bool((chunk_idx[: n // 2] == chunk_idx[n // 2:]).all())


def run_sampler(head, z, chunk_idx, temperature=1.0, cfg=1.0, noise=None, generator=None,
                step_noises=None, sampler="ddpm", eta=0.0, backend="auto"):
    if backend not in _BACKENDS:
        raise ValueError(f"unknown sampler backend {backend!r}; valid: {', '.join(_BACKENDS)}")
    if sampler not in _SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(_SAMPLERS)}")
    head.check_inputs(z, chunk_idx)
    if z.shape[0] == 0:
        raise ValueError("cannot sample an empty batch (z has 0 rows)")
    use_ext = backend == "ext"
    if backend == "auto":
        from . import sampler_ext
        use_ext = sampler_ext.available() and _ext_can_run(z, chunk_idx, cfg)
    if not use_ext:
        return reference_sample(head, z, chunk_idx, temperature, cfg, noise, generator,
                                step_noises, sampler, eta)
    if not _ext_can_run(z, chunk_idx, cfg):
        raise ValueError("the extension samples CFG with an all-zero unconditional half and the "
                         "same chunk indices in both halves; use backend='torch' otherwise")
    from . import sampler_ext
    n = z.shape[0]
    rows = n // 2 if cfg != 1.0 else n
    d, steps = head.in_channels, head.gen_diffusion.num_timesteps
    if noise is None and step_noises is None:
        # Same draws, same order as the reference loop, so a seeded run gives the same tokens.
        if cfg != 1.0:
            x_T = torch.randn((rows, d), generator=generator, device=z.device)
            per_step = torch.stack([torch.randn((n, d), generator=generator,
                                                device=z.device)[:rows] for _ in range(steps)])
        else:
            x_T, per_step = _draw_noises(steps, (n, d), generator, z.device)
    else:
        if noise is None or step_noises is None:
            raise ValueError("pass both noise and step_noises, or neither")
        x_T, per_step = noise[:rows], step_noises[:, :rows]
    out = sampler_ext.sample(head, z[:rows], chunk_idx[:rows], x_T, per_step, cfg=cfg,
                             temperature=temperature, ddim=(sampler == "ddim"), eta=eta)
    return torch.cat([out, out], dim=0) if cfg != 1.0 else out


@torch.no_grad()
def guided_sample(head, z, chunk_idx, cfg=2.0, temperature=1.0, generator=None, noise=None,
                  step_noises=None, **kw):
    """One generated token per row of the conditional ``z``, with classifier-free guidance.
    ``noise`` (rows, d) and ``step_noises`` (steps, rows, d), when given, are the conditional
    rows' x_T and per-step noises (the unconditional half shares them)."""
    if cfg == 1.0:
        return head.sample(z, chunk_idx, temperature=temperature, cfg=1.0, generator=generator,
                           noise=noise, step_noises=step_noises, **kw)
    zz = torch.cat([z, torch.zeros_like(z)], dim=0)
    kk = torch.cat([chunk_idx, chunk_idx], dim=0)
    if noise is not None:
        noise = torch.cat([noise, noise], dim=0)
    if step_noises is not None:
        step_noises = torch.cat([step_noises, step_noises], dim=1)
    return head.sample(zz, kk, temperature=temperature, cfg=cfg, generator=generator,
                       noise=noise, step_noises=step_noises, **kw)[: z.shape[0]]


def noise_seed(seed: int, image: int, draw: int) -> int:
    """The seed of one image's noise for one draw: a function of (seed, image index, draw)
    alone, so an image gets the same noise whatever its batch, rank or evaluation entry."""
    return ((seed * 2_000_003 + image) * 1_000_033 + draw) % (2 ** 63)


def image_noises(seed: int, image_ids, draw: int, tokens: int, dim: int, steps: int, device):
    """x_T (B * tokens, dim) and per-step noises (steps, B * tokens, dim) for the images
    ``image_ids`` (global dataset indices), row order as :meth:`head.generate` lays tokens out
    (image-major). Drawn on the CPU from one generator per (image, draw): the trainer's final
    evaluation and ``gendd_fast.evaluate`` then score a checkpoint with the same noise, hence
    the same number, whatever their batch sizes or process counts."""
    per_image = []
    for i in image_ids.tolist() if torch.is_tensor(image_ids) else list(image_ids):
        g = torch.Generator().manual_seed(noise_seed(seed, int(i), draw))
        per_image.append(torch.randn((steps + 1, tokens, dim), generator=g))
    n = torch.stack(per_image).to(device)            # (B, steps + 1, tokens, dim)
    b = n.shape[0]
    x_T = n[:, 0].reshape(b * tokens, dim)
    step = n[:, 1:].permute(1, 0, 2, 3).reshape(steps, b * tokens, dim)
    return x_T, step
