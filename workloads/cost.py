"""Cost model: per-layer MACs and parameters measured with forward hooks, and the BitOps and model
size of a policy.

MACs are counted per sample at the configured input size from the layers' real output shapes:
Conv2d: out_elems * (in_channels / groups) * kh * kw; Linear: out_elems * in_features.
Parameters are weight elements (biases are not quantized and not counted, as in LIMPQ).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .quant.policy import Policy


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # "conv" | "linear"
    macs: int
    params: int


@torch.no_grad()
def layer_costs(model: nn.Module, input_shape: Sequence[int]) -> list[LayerCost]:
    """MACs and params of every Conv2d/Linear, in execution order, for one input of ``input_shape``.

    Runs a forward pass on zeros in eval mode; quantizers are switched off for it and restored.
    """
    from .quant.swap import QUANT_TYPES  # local: swap imports this module's neighbours

    names = {m: n for n, m in model.named_modules()}
    saved = [(m, m.bits) for m in model.modules() if isinstance(m, QUANT_TYPES)]
    for m, _ in saved:
        m.set_bits(None, None)
    out: list[LayerCost] = []

    def hook(module, inputs, output):
        name = getattr(module, "layer_name", names[module])
        per_sample = output[0].numel()
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = per_sample * (module.in_channels // module.groups) * kh * kw
            out.append(LayerCost(name, "conv", int(macs), module.weight.numel()))
        else:
            out.append(LayerCost(name, "linear", int(per_sample * module.in_features), module.weight.numel()))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        for m, (w, a) in saved:
            m.set_bits(w, a)
    return out


def total_macs(costs: Sequence[LayerCost]) -> int:
    return sum(c.macs for c in costs)


def policy_bitops(costs: Sequence[LayerCost], policy: Policy, fixed_bits: int = 8) -> int:
    """BitOps = sum of MACs * w_bits * a_bits; layers not in the policy run at fixed_bits."""
    bits = policy.as_dict()
    return sum(c.macs * (bits[c.name][0] * bits[c.name][1] if c.name in bits else fixed_bits**2) for c in costs)


def policy_size_bits(costs: Sequence[LayerCost], policy: Policy, fixed_bits: int = 8) -> int:
    """Weight storage in bits; layers not in the policy stored at fixed_bits."""
    bits = policy.as_dict()
    return sum(c.params * (bits[c.name][0] if c.name in bits else fixed_bits) for c in costs)


def uniform_bitops(costs: Sequence[LayerCost], w: int, a: int, searchable: Sequence[str] | None = None) -> int:
    """BitOps of uniform WwAa over the searchable layers (all layers if none are named)."""
    names = set(searchable) if searchable is not None else {c.name for c in costs}
    return sum(c.macs * w * a for c in costs if c.name in names)
