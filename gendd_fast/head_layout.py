"""The GenDD head's weight layout, named once: used by the reference head (head.py), the fused
head (fused_head.py) and the sampler extension's Python side (sampler_ext.py), so the order
csrc/sampler.cpp unpacks is written in one place. Imports nothing of the package."""
from __future__ import annotations

import torch.nn as nn

# The tensors of a SimpleMLPAdaLN (state-dict names) in the order the sampler extension unpacks
# them (csrc/sampler.cpp's unpack checks each shape): the stem, each residual block (under
# res_blocks.{i}.), the final layer.
HEAD_STEM = ("time_embed.mlp.0.weight", "time_embed.mlp.0.bias", "time_embed.mlp.2.weight",
             "time_embed.mlp.2.bias", "cond_embed.weight", "cond_embed.bias", "pos_embed.weight",
             "input_proj.weight", "input_proj.bias")
HEAD_BLOCK = ("in_ln.weight", "in_ln.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
              "mlp.2.bias", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias")
HEAD_FINAL = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
              "final_layer.linear.weight", "final_layer.linear.bias")


def head_tensor_names(depth: int):
    """Every tensor name of a depth-``depth`` head, in the sampler extension's order."""
    return (list(HEAD_STEM) + [f"res_blocks.{i}.{n}" for i in range(depth) for n in HEAD_BLOCK]
            + list(HEAD_FINAL))


def head_tensors(net: nn.Module):
    """The head's tensors (detached) in :func:`head_tensor_names` order."""
    params = dict(net.named_parameters())
    return [params[n].detach() for n in head_tensor_names(len(net.res_blocks))]


def modulation_layers(net: nn.Module):
    """The adaLN modulation Linears, block by block, then the final layer's (zero-initialised by
    the reference head, stacked into one GEMM by the fused head and the sampler)."""
    return ([b.adaLN_modulation[1] for b in net.res_blocks]
            + [net.final_layer.adaLN_modulation[1]])
