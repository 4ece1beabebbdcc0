"""The GenDD diffusion head: MAR's ``SimpleMLPAdaLN`` with a token-position table, and ``DiffLoss``.

Parameter names, shapes and initialisation are the reference's, so a state dict moves between the
public GenDD code and this module unchanged. Unlike the reference it runs on any device and takes
explicit ``t``, ``noise`` and ``generator`` for reproducible runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .diffusion import NUM_TRAIN_TIMESTEPS, create_diffusion
from .head_layout import modulation_layers

FREQUENCY_EMBEDDING_SIZE = 256


def draw_row_randomness(n_rows: int, token_dim: int, cond_drop_prob: float, device,
                        generator: Optional[torch.Generator] = None):
    """The per-row draws of a GenDD training step, in one fixed order (so every head, reference
    or fused, sees the same numbers from the same generator): condition keep-mask, timestep,
    noise."""
    keep = torch.rand(n_rows, device=device, generator=generator) >= cond_drop_prob
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (n_rows,), device=device, generator=generator)
    noise = torch.randn(n_rows, token_dim, device=device, generator=generator)
    return keep, t, noise


def split_tokens(target: torch.Tensor, token_dim: int) -> int:
    """Number of tokens L of a (B, D_t) feature; a clear error when d does not divide D_t."""
    if target.ndim != 2:
        raise ValueError(f"teacher feature must be (B, D_t); got {tuple(target.shape)}")
    if target.shape[1] % token_dim:
        raise ValueError(f"token size {token_dim} does not divide the teacher's feature width "
                         f"{target.shape[1]}; choose a token size that divides it")
    return target.shape[1] // token_dim


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features ``[cos(t f_i), sin(t f_i)]``, ``f_i = max_period^(-i / half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size))


class ResBlock(nn.Module):
    """h + gate * MLP(LN(h) * (1 + scale) + shift), (shift, scale, gate) from the condition y."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(),
                                 nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, model_channels: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(model_channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(model_channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(model_channels,
                                                                   2 * model_channels))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Residual AdaLN MLP: ``(x_t, t, z, k) -> [eps_hat, v]`` for one 64-dim token per row."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, num_chunks: int, grad_checkpointing: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.num_chunks = num_chunks
        self.grad_checkpointing = grad_checkpointing

        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.pos_embed = nn.Embedding(num_chunks, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList([ResBlock(model_channels) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Zero-initialised modulations make every block start as the identity.
        for layer in modulation_layers(self):
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def condition(self, t, c, chunk_idx):
        """y = time_embed(t) + cond_embed(z) + pos_embed(k): the AdaLN conditioning per row."""
        return self.time_embed(t) + self.cond_embed(c) + self.pos_embed(chunk_idx)

    def forward(self, x, t, c, chunk_idx):
        x = self.input_proj(x)
        y = self.condition(t, c, chunk_idx)
        for block in self.res_blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x, t, c, chunk_idx, cfg_scale: float):
        """Classifier-free guidance on a doubled batch ``[cond; uncond]`` that shares x.

        Only eps is mixed; the variance channels stay each half's own, so the first (kept) half
        samples with the conditional variance.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c, chunk_idx)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


class DiffLoss(nn.Module):
    """Diffusion loss on 64-dim tokens, conditioned on the student's feature (drop-in head).

    ``forward(target, z, chunk_idx)`` returns the mean loss over rows; ``sample(z, chunk_idx, ...)``
    generates tokens. As in MAR/GenDD, with ``cfg != 1`` the caller passes the doubled batch
    ``[z; z_uncond]`` (and chunk indices doubled likewise) and keeps the first half of the output;
    :func:`gendd_fast.sampling.guided_sample` does the doubling for you.
    """

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int,
                 num_sampling_steps, num_chunks: int, grad_checkpointing: bool = False,
                 noise_schedule: str = "cosine"):
        super().__init__()
        for name, v in (("target_channels", target_channels), ("z_channels", z_channels),
                        ("depth", depth), ("width", width), ("num_chunks", num_chunks)):
            if int(v) < 1:
                raise ValueError(f"DiffLoss: {name} must be a positive integer, got {v!r}")
        self.in_channels = target_channels
        self.z_channels = z_channels
        self.num_chunks = num_chunks
        self.num_sampling_steps = str(num_sampling_steps)
        self.net = SimpleMLPAdaLN(in_channels=target_channels, model_channels=width,
                                  out_channels=target_channels * 2, z_channels=z_channels,
                                  num_res_blocks=depth, num_chunks=num_chunks,
                                  grad_checkpointing=grad_checkpointing)
        self.noise_schedule = noise_schedule
        self.train_diffusion = create_diffusion(timestep_respacing="",
                                                noise_schedule=noise_schedule)
        self.set_sampling_steps(self.num_sampling_steps)

    def set_sampling_steps(self, num_sampling_steps):
        """Respace the sampler (e.g. ``"64"``, ``"ddim50"``); training is unaffected."""
        self.num_sampling_steps = str(num_sampling_steps)
        self.gen_diffusion = create_diffusion(timestep_respacing=self.num_sampling_steps,
                                              noise_schedule=self.noise_schedule)

    # -- input checks (clear errors instead of shape failures deep inside a matmul) -----------
    def check_inputs(self, z, chunk_idx, target=None):
        if z.ndim != 2 or z.shape[1] != self.z_channels:
            raise ValueError(f"z must be (N, {self.z_channels}); got {tuple(z.shape)}")
        if chunk_idx.ndim != 1 or chunk_idx.shape[0] != z.shape[0]:
            raise ValueError(f"chunk_idx must be (N,) with N = {z.shape[0]} rows of z; got "
                             f"{tuple(chunk_idx.shape)}")
        if chunk_idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"chunk_idx must be an integer tensor, got {chunk_idx.dtype}")
        if chunk_idx.numel() and (int(chunk_idx.min()) < 0
                                  or int(chunk_idx.max()) >= self.num_chunks):
            raise ValueError(f"chunk_idx out of range: values must lie in [0, {self.num_chunks})"
                             f", got [{int(chunk_idx.min())}, {int(chunk_idx.max())}]")
        if target is not None:
            if target.ndim != 2 or target.shape[1] != self.in_channels:
                hint = ""
                if target.ndim == 2 and target.shape[1] % self.in_channels == 0:
                    hint = (f" (split a {target.shape[1]}-wide feature into "
                            f"{target.shape[1] // self.in_channels} tokens first)")
                raise ValueError(f"target must be (N, {self.in_channels}) tokens; got "
                                 f"{tuple(target.shape)}{hint}")
            if target.shape[0] != z.shape[0]:
                raise ValueError(f"batch sizes differ: target has {target.shape[0]} rows, z has "
                                 f"{z.shape[0]}")

    def forward(self, target, z, chunk_idx, t: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, reduction: str = "mean"):
        self.check_inputs(z, chunk_idx, target)
        t = self.training_timesteps(target.shape[0], target.device, t, generator)
        losses = self.train_diffusion.training_losses(
            self.net, target, t, model_kwargs=dict(c=z, chunk_idx=chunk_idx), noise=noise,
            generator=generator)
        return losses["loss"].mean() if reduction == "mean" else losses["loss"]

    def tile_tokens(self, target, z, mul: int):
        """Split tokenization of (B, D_t) targets for per-image conditions z (B, D_s): the
        (B * L * mul, d) rows, row ``b * L + k`` of each of the ``mul`` tiled blocks being token k
        of image b. Checks that the shapes fit this head."""
        L = split_tokens(target, self.in_channels)
        if L != self.num_chunks:
            raise ValueError(f"teacher feature width {target.shape[1]} gives {L} tokens of "
                             f"{self.in_channels}, but the head was built for {self.num_chunks}")
        if z.ndim != 2 or z.shape[0] != target.shape[0] or z.shape[1] != self.z_channels:
            raise ValueError(f"z must be (B, {self.z_channels}) with B = {target.shape[0]}; got "
                             f"{tuple(z.shape)}")
        B = target.shape[0]
        return target.reshape(B * L, self.in_channels).repeat(mul, 1)

    @staticmethod
    def training_timesteps(n: int, device, t: Optional[torch.Tensor] = None,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``t`` checked, or drawn uniformly from the training steps when not given."""
        if t is None:
            return torch.randint(0, NUM_TRAIN_TIMESTEPS, (n,), device=device,
                                 generator=generator)
        if t.shape != (n,) or int(t.min()) < 0 or int(t.max()) >= NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"t must be ({n},) timesteps in [0, {NUM_TRAIN_TIMESTEPS}); got "
                             f"shape {tuple(t.shape)}")
        return t

    def distill_loss(self, target, z, mul: int, cond_drop_prob: float,
                     generator: Optional[torch.Generator] = None):
        """The GenDD step's diffusion loss from per-image tensors.

        ``target`` (B, D_t) teacher features (after contraction and mixing), ``z`` (B, D_s)
        student conditions. Split tokenization gives B * L rows (see :meth:`tile_tokens`),
        tiled ``mul`` times, and each row's condition is dropped with probability
        ``cond_drop_prob``. Returns the mean loss over the B * L * mul rows.
        """
        x0 = self.tile_tokens(target, z, mul)
        B, L = target.shape[0], self.num_chunks
        z_rows = z.repeat_interleave(L, dim=0).repeat(mul, 1)
        k = torch.arange(L, device=z.device).repeat(B * mul)
        keep, t, noise = draw_row_randomness(x0.shape[0], self.in_channels, cond_drop_prob,
                                             z.device, generator)
        z_rows = z_rows * keep[:, None].to(z_rows.dtype)
        return self.forward(x0, z_rows, k, t=t, noise=noise)

    @torch.no_grad()
    def generate(self, z, num_tokens: Optional[int] = None, cfg: float = 1.0,
                 temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                 **kw):
        """Features (B, L * d) generated from per-image conditions ``z`` (B, D_s)."""
        from .sampling import guided_sample
        L = num_tokens or self.num_chunks
        B = z.shape[0]
        z_rows = z.repeat_interleave(L, dim=0)
        k = torch.arange(L, device=z.device).repeat(B)
        tokens = guided_sample(self, z_rows, k, cfg=cfg, temperature=temperature,
                               generator=generator, **kw)
        return tokens.reshape(B, L * self.in_channels)

    @torch.no_grad()
    def sample(self, z, chunk_idx, temperature: float = 1.0, cfg: float = 1.0,
               noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               step_noises: Optional[torch.Tensor] = None, sampler: str = "ddpm",
               eta: float = 0.0, backend: str = "auto"):
        """Generate one token per row of ``z`` (doubled ``[cond; uncond]`` when ``cfg != 1``).

        ``backend``: ``"torch"`` is the reference Python loop; ``"ext"`` the C++/CUDA extension
        (:mod:`gendd_fast.sampler_ext`); ``"auto"`` takes the extension when it can run this case.
        """
        from .sampling import run_sampler
        return run_sampler(self, z, chunk_idx, temperature=temperature, cfg=cfg, noise=noise,
                           generator=generator, step_noises=step_noises, sampler=sampler,
                           eta=eta, backend=backend)
