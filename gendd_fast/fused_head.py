"""``FusedDiffLoss``: the GenDD head's training loss through the Triton kernels of
:mod:`gendd_fast.kernels`.

Same constructor, parameter names, state dict, ``sample`` and ``generate`` as :class:`DiffLoss`
(a checkpoint moves between the two unchanged). The training step differs in how, not what:

- the time MLP runs once per timestep (all of them: no ``unique``, no host sync),
  ``cond_embed`` once per image (a dropped row uses its bias alone), the position table once
  per token; the rows gather them;
- every adaLN modulation comes from one GEMM with SiLU in the prologue;
- each residual block is two GEMMs with LayerNorm + modulate in the prologue and bias + SiLU /
  bias + gate + residual in the epilogues; the final layer likewise;
- MSE and the VB term are one per-row kernel that also writes the output gradient;
- the whole step is one autograd function (:mod:`gendd_fast.kernels.head_step`).

Compute dtype: the autocast dtype when autocast is on, else the parameters' dtype; the fp32
masters are cast once per optimizer step into one buffer (:meth:`FusedDiffLoss.step_weights`)
and accumulation is fp32. Where Triton cannot
run (no CUDA device and no ``TRITON_INTERPRET=1``), the reference computation runs instead, with
a one-line notice.
"""
from __future__ import annotations

from typing import Optional

import torch

from .head import DiffLoss, draw_row_randomness
from .head_layout import modulation_layers
from .notice import notice

def fused_unavailable_reason(device) -> Optional[str]:
    from .kernels import unavailable_reason
    return unavailable_reason(torch.device(device))


class FusedDiffLoss(DiffLoss):
    """Drop-in :class:`DiffLoss` whose training loss runs fused Triton kernels."""

    # CPU with few rows (the interpreter's tests): run the time MLP over the distinct timesteps
    # only; False keeps the CUDA path (all timesteps, no unique()), e.g. to measure its host cost
    distinct_steps_on_cpu = True

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
        return self.row_losses(target, t, noise, chunk_idx, z,
                               torch.arange(n, device=target.device), reduction=reduction)

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
        return self.row_losses(x0, t, noise, k, z, ci, reduction="mean")

    # -- the fused computation ---------------------------------------------------------------------
    def _consts(self, device, dt):
        """The loss tables and every timestep's sinusoidal features (constants: computed on the
        first step on a device, per head so the launch check records the kernel too)."""
        from .kernels.diffusion_loss import loss_tables
        from .kernels.head_step import StepConsts
        from .kernels.timestep_embedding import timestep_features
        cache = self.__dict__.setdefault("_fused_consts", {})
        key = (device, dt)
        if key not in cache:
            tab = loss_tables(self.train_diffusion, device)
            steps = torch.arange(tab.shape[0], device=device)
            cache[key] = StepConsts(timestep_features(steps).to(dt), tab, tab[:, 0].contiguous(),
                                    tab[:, 1].contiguous())
        return cache[key]

    def _masters(self):
        """The parameters in :func:`kernels.head_step.master_index` order (looked up once: the
        Parameter objects survive ``.to``, ``load_state_dict`` and optimizer steps)."""
        cached = self.__dict__.get("_fused_masters")
        if cached is not None and cached[0] is self.net:
            return cached[1]
        net = self.net
        te = net.time_embed.mlp
        out = [te[0].weight, te[0].bias, te[2].weight, te[2].bias, net.cond_embed.weight,
               net.cond_embed.bias, net.pos_embed.weight]
        for lin in modulation_layers(net):  # blocks in order, then the final layer
            out += [lin.weight, lin.bias]
        out += [net.input_proj.weight, net.input_proj.bias]
        for b in net.res_blocks:
            out += [b.in_ln.weight, b.in_ln.bias, b.mlp[0].weight, b.mlp[0].bias,
                    b.mlp[2].weight, b.mlp[2].bias]
        out += [net.final_layer.linear.weight, net.final_layer.linear.bias]
        self.__dict__["_fused_masters"] = (net, out)
        return out

    def step_weights(self, dt, device, masters=None):
        """The GEMM weights in the compute dtype, cast once per optimizer step: one buffer, two
        ``_foreach_copy_`` (weights; stacked modulation biases), refreshed when any master's
        version counter or storage changed (an optimizer step, ``load_state_dict``, ``.to``).
        In-place writes through ``p.data`` bypass the version counter: call
        :meth:`invalidate_weights` after those."""
        from .kernels.head_step import StepWeights, master_index
        m = masters if masters is not None else self._masters()
        D = len(self.net.res_blocks)
        ix = master_index(D)
        wi = ([0, 2, 4] + ix["mod_w"] + [ix["in_w"]] + ix["w0"] + ix["w2"] + [ix["fin_w"]])
        bi = ix["mod_b"]
        key = tuple((m[j]._version, m[j].data_ptr()) for j in wi + bi)
        cache = self.__dict__.setdefault("_fused_weights", {})
        hit = cache.get((dt, device))
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():  # a new buffer: a step still holding the old one keeps it
            flat = torch.empty(sum(m[j].numel() for j in wi), device=device, dtype=dt)
            views, o = [], 0
            for j in wi:
                views.append(flat[o:o + m[j].numel()].view(m[j].shape))
                o += m[j].numel()
            torch._foreach_copy_(views, [m[j] for j in wi])
            bflat = torch.empty(sum(m[j].numel() for j in bi), device=device,
                                dtype=torch.float32)
            bviews, o = [], 0
            for j in bi:
                bviews.append(bflat[o:o + m[j].numel()])
                o += m[j].numel()
            torch._foreach_copy_(bviews, [m[j] for j in bi])
        nm = len(ix["mod_w"])
        mod_rows = sum(m[j].shape[0] for j in ix["mod_w"])
        mod0 = sum(m[j].numel() for j in wi[:3])
        W = m[0].shape[0]
        w = StepWeights(dt, views[0], views[1], views[2],
                        flat[mod0:mod0 + mod_rows * W].view(mod_rows, W), bflat,
                        views[3 + nm], views[4 + nm:4 + nm + D], views[4 + nm + D:4 + nm + 2 * D],
                        views[-1])
        cache[(dt, device)] = (key, w)
        return w

    def invalidate_weights(self):
        self.__dict__.pop("_fused_weights", None)

    def row_losses(self, x0, t, noise, k, z_img, ci, reduction: str = "none"):
        """Per-row loss (``reduction="none"``) or its mean, of rows ``x0`` (N, d) whose
        condition is ``cond_embed(z_img)[ci]``, or the bias alone where ``ci == len(z_img)``.
        One autograd function runs the whole step (:mod:`gendd_fast.kernels.head_step`)."""
        from .kernels.head_step import HeadStepFunction

        device = x0.device
        dev_type = device.type
        m = self._masters()
        if torch.is_autocast_enabled(dev_type):
            dt = torch.get_autocast_dtype(dev_type)
        else:
            dt = m[0].dtype
        consts = self._consts(device, dt)
        wts = self.step_weights(dt, device, m)
        t = t.contiguous()
        ti = t
        if dev_type != "cuda" and self.distinct_steps_on_cpu and \
                t.numel() < 2 * consts.feat.shape[0]:
            # few rows on CPU (the interpreter): the time MLP over the distinct steps only;
            # unique() syncs, which costs nothing here, while CUDA keeps the sync-free path
            from .kernels.head_step import StepConsts
            steps, ti = torch.unique(t, return_inverse=True)
            consts = StepConsts(consts.feat[steps], consts.tab, consts.sqrt_ac,
                                consts.sqrt_1mac)
        return HeadStepFunction.apply(x0, noise, t, ti, k.contiguous(), ci.contiguous(), z_img,
                                      reduction == "mean", consts, wts, *m)
