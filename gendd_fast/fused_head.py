"""``FusedDiffLoss``: the GenDD head's training loss through the Triton kernels of
:mod:`gendd_fast.kernels`.

Same constructor, parameter names, state dict, ``sample`` and ``generate`` as :class:`DiffLoss`
(a checkpoint moves between the two unchanged). The training step differs in how, not what:

- the time MLP runs once per distinct timestep, ``cond_embed`` once per image (a dropped row
  uses its bias alone), the position table once per token; the rows gather them;
- every adaLN modulation comes from GEMMs with SiLU in the prologue;
- each residual block is two GEMMs with LayerNorm + modulate in the prologue and bias + SiLU /
  bias + gate + residual in the epilogues; the final layer likewise;
- MSE and the VB term are one per-row kernel that also writes the output gradient.

Compute dtype: the autocast dtype when autocast is on, else the parameters' dtype; weights stay
fp32 masters (tiles are cast inside the kernels) and accumulation is fp32. Where Triton cannot
run (no CUDA device and no ``TRITON_INTERPRET=1``), the reference computation runs instead, with
a one-line notice.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .head import DiffLoss, draw_row_randomness
from .notice import notice

def fused_unavailable_reason(device) -> Optional[str]:
    from .kernels import unavailable_reason
    return unavailable_reason(torch.device(device))


class FusedDiffLoss(DiffLoss):
    """Drop-in :class:`DiffLoss` whose training loss runs fused Triton kernels."""

    def forward(self, target, z, chunk_idx, t: Optional[torch.Tensor] = None,
                noise: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, reduction: str = "mean"):
        reason = fused_unavailable_reason(target.device)
        if reason:
            notice(f"FusedDiffLoss falls back to the reference head ({reason})", once=True)
            return super().forward(target, z, chunk_idx, t=t, noise=noise, generator=generator,
                                   reduction=reduction)
        self.check_inputs(z, chunk_idx, target)
        n = target.shape[0]
        t = self.training_timesteps(n, target.device, t, generator)
        if noise is None:
            noise = torch.randn(target.shape, generator=generator, device=target.device)
        # Generic rows: each row is its own "image" for the condition table.
        rows = self.row_losses(target, t, noise, chunk_idx, z,
                               torch.arange(n, device=target.device))
        return rows.mean() if reduction == "mean" else rows

    def distill_loss(self, target, z, mul: int, cond_drop_prob: float,
                     generator: Optional[torch.Generator] = None):
        reason = fused_unavailable_reason(target.device)
        if reason:
            notice(f"FusedDiffLoss falls back to the reference head ({reason})", once=True)
            return super().distill_loss(target, z, mul, cond_drop_prob, generator)
        x0 = self.tile_tokens(target, z, mul)
        B, L, d, n = target.shape[0], self.num_chunks, self.in_channels, x0.shape[0]
        # Same draws, same order as the reference (DiffLoss.distill_loss).
        keep, t, noise = draw_row_randomness(n, d, cond_drop_prob, target.device, generator)
        r = torch.arange(n, device=target.device) % (B * L)  # row within the tiled block
        image, k = r // L, r % L
        ci = torch.where(keep, image, torch.full_like(image, B))  # row B: the bias alone
        return self.row_losses(x0, t, noise, k, z, ci).mean()

    # -- the fused computation ---------------------------------------------------------------------
    def _tables(self, device):
        from .kernels.diffusion_loss import loss_tables
        cache = self.__dict__.setdefault("_fused_tables", {})
        if device not in cache:
            tab = loss_tables(self.train_diffusion, device)
            cache[device] = (tab, tab[:, 0].contiguous(), tab[:, 1].contiguous())
        return cache[device]

    def row_losses(self, x0, t, noise, k, z_img, ci):
        """Per-row loss of rows ``x0`` (N, d) whose condition is ``cond_embed(z_img)[ci]``, or the
        bias alone where ``ci == len(z_img)``."""
        from .kernels.adaln_block import adaln_block
        from .kernels.adaln_condition import adaln_condition
        from .kernels.adaln_modulation import adaln_modulation
        from .kernels.diffusion_loss import diffusion_loss
        from .kernels.final_layer import final_layer
        from .kernels.linear import fused_linear
        from .kernels.noise_injection import noise_injection
        from .kernels.timestep_embedding import timestep_features, timestep_table

        net, device = self.net, x0.device
        dev_type = device.type
        if torch.is_autocast_enabled(dev_type):
            dt = torch.get_autocast_dtype(dev_type)
        else:
            dt = net.input_proj.weight.dtype
        tables, sqrt_ac, sqrt_1mac = self._tables(device)
        W = net.model_channels
        with torch.autocast(device_type=dev_type, enabled=False):
            x_t = noise_injection(x0, noise, t, sqrt_ac, sqrt_1mac)
            steps, ti = timestep_table(t)
            te = net.time_embed.mlp
            temb = F.linear(F.silu(F.linear(timestep_features(steps).to(dt), te[0].weight.to(dt),
                                            te[0].bias.to(dt))), te[2].weight.to(dt),
                            te[2].bias.to(dt))
            cb = net.cond_embed.bias.to(dt)
            cond = torch.cat([F.linear(z_img.to(dt), net.cond_embed.weight.to(dt), cb), cb[None]])
            y = adaln_condition(temb, ti, cond, ci, net.pos_embed.weight.to(dt), k, out_dtype=dt)
            layers = [(b.adaLN_modulation[1].weight, b.adaLN_modulation[1].bias)
                      for b in net.res_blocks]
            fl = net.final_layer
            layers.append((fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias))
            mods = adaln_modulation(y, layers, dot_dtype=dt).split(W, dim=1)
            h = fused_linear(x_t, net.input_proj.weight, net.input_proj.bias, out_dtype=dt,
                             dot_dtype=dt)
            for i, b in enumerate(net.res_blocks):
                shift, scale, gate = mods[3 * i: 3 * i + 3]
                h = adaln_block(h, shift, scale, gate, b.in_ln.weight, b.in_ln.bias,
                                b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight, b.mlp[2].bias,
                                dot_dtype=dt)
            out = final_layer(h, mods[-2], mods[-1], fl.linear.weight, fl.linear.bias,
                              dot_dtype=dt)
            return diffusion_loss(out, x0.float(), x_t, noise.float(), t, tables)
