"""Turn any torch model into a LIMPQ-searchable quantized model, without editing its source, and
switch it between full precision, uniform bits, random policies and explicit per-layer policies.

- Every Conv2d / Linear becomes a QConv2d / QLinear (weights shared across bit-widths).
- Every BatchNorm2d becomes a SwitchableBatchNorm2d and follows the weight bit of the conv that
  feeds it (found in registration order, which is execution order for torchvision's CNNs).
- The first conv and the last linear are *fixed*: full precision during indicator training,
  W8A8 whenever a policy is applied. Which layers are fixed is configurable by name.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .modules import QConv2d, QLinear, SwitchableBatchNorm2d, quantized_copy
from .policy import Policy

FIXED_BITS = 8
QUANT_TYPES = (QConv2d, QLinear)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def default_fixed_layers(model: nn.Module) -> list[str]:
    """First Conv2d and last Linear (or last Conv2d if the model has no Linear)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    lins = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    fixed = []
    if convs:
        fixed.append(convs[0])
    last = lins[-1] if lins else (convs[-1] if len(convs) > 1 else None)
    if last is not None and last not in fixed:
        fixed.append(last)
    return fixed


def quantize_model(
    model: nn.Module,
    bits: Sequence[int] = (6, 5, 4, 3, 2),
    fixed_layers: Iterable[str] | None = None,
    policy: Policy | None = None,
) -> nn.Module:
    """Swap layers in place and return the model.

    With ``policy`` the model is built in single-bit mode (for finetuning a chosen policy): each
    searchable layer's quantizers and BN hold only that layer's bits, and the policy is applied.
    """
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    fixed = list(default_fixed_layers(model) if fixed_layers is None else fixed_layers)
    unknown = [f for f in fixed if f not in names]
    if unknown:
        raise ValueError(f"fixed layer(s) {unknown} are not Conv2d/Linear layers of the model")
    per_layer = policy.as_dict() if policy is not None else {}
    if policy is not None:
        missing = sorted(names - set(fixed) - set(per_layer))
        if missing:
            raise ValueError(f"policy gives no bits for layer(s) {missing}")

    last_conv: nn.Module | None = None
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not isinstance(module, QUANT_TYPES):
            if name in fixed:
                wb = ab = (FIXED_BITS,)
            elif name in per_layer:
                wb, ab = (per_layer[name][0],), (per_layer[name][1],)
            else:
                wb = ab = tuple(bits)
            q = quantized_copy(module, wb, ab)
            q.fixed = name in fixed
            q.layer_name = name
            q.bn = None
            _set_submodule(model, name, q)
            last_conv = q
        elif isinstance(module, nn.BatchNorm2d):
            if last_conv is None or last_conv.fixed:
                continue  # BN after a fixed layer always runs at one precision
            sbn = SwitchableBatchNorm2d(module, last_conv.w_quant.bits)
            if policy is not None:
                # Single-bit mode trains only the policy's BN; the FP copy would be a parameter with no
                # gradient, which DDP refuses (or must search for every step).
                sbn.fp.requires_grad_(False)
            _set_submodule(model, name, sbn)
            # A plain attribute, not a submodule: the BN is registered where it already lives.
            object.__setattr__(last_conv, "bn", sbn)
    set_full_precision(model)
    if policy is not None:
        set_policy(model, policy)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def quant_layers(model: nn.Module, fixed: bool = False) -> list[tuple[str, nn.Module]]:
    """Searchable (or, with fixed=True, fixed) quantized layers in registration order."""
    return [(m.layer_name, m) for _, m in _unwrap(model).named_modules()
            if isinstance(m, QUANT_TYPES) and m.fixed == fixed]


def searchable_names(model: nn.Module) -> list[str]:
    return [n for n, _ in quant_layers(model)]


def _set_layer(layer: nn.Module, w: int | None, a: int | None) -> None:
    layer.set_bits(w, a)
    if layer.bn is not None:
        layer.bn.set_bits(w)


def set_full_precision(model: nn.Module) -> None:
    for _, m in quant_layers(model) + quant_layers(model, fixed=True):
        _set_layer(m, None, None)


def set_uniform(model: nn.Module, bits: int) -> Policy:
    """All searchable layers at W``bits``A``bits``; fixed layers stay full precision (training)."""
    layers = quant_layers(model)
    for _, m in layers:
        _set_layer(m, bits, bits)
    for _, m in quant_layers(model, fixed=True):
        _set_layer(m, None, None)
    return Policy.uniform([n for n, _ in layers], bits)


def draw_random_policies(layers: Sequence[str], bits: Sequence[int], generator: torch.Generator,
                         n: int = 1) -> list[Policy]:
    """``n`` random policies: each layer an independently, uniformly drawn weight bit and activation
    bit. Drawn in one go so a training loop reads the draws to the host once, not once per step."""
    idx = torch.randint(len(bits), (n, len(layers), 2), generator=generator).tolist()
    names = tuple(layers)
    return [Policy(names, tuple(bits[i] for i, _ in d), tuple(bits[j] for _, j in d)) for d in idx]


def set_random(model: nn.Module, bits: Sequence[int], generator: torch.Generator) -> Policy:
    """Apply one random policy (``draw_random_policies``); fixed layers stay full precision."""
    (policy,) = draw_random_policies(searchable_names(model), bits, generator)
    set_policy(model, policy, fixed_bits=None)
    return policy


def set_policy(model: nn.Module, policy: Policy, fixed_bits: int | None = FIXED_BITS) -> None:
    """Apply an explicit policy; fixed layers at W8A8 (or FP with fixed_bits=None)."""
    layers = dict(quant_layers(model))
    if set(layers) != set(policy.layers):
        raise ValueError(
            f"policy layers do not match the model: missing {sorted(set(layers) - set(policy.layers))}, "
            f"unknown {sorted(set(policy.layers) - set(layers))}"
        )
    for name, (w, a) in policy.as_dict().items():
        _set_layer(layers[name], w, a)
    for _, m in quant_layers(model, fixed=True):
        _set_layer(m, fixed_bits, fixed_bits)


def indicator_records(model: nn.Module) -> list[dict]:
    """The learned step sizes (LIMPQ's importance indicators): one record per (layer, kind, bits)."""
    rows = []
    for name, m in quant_layers(model):
        for kind, q in (("weight", m.w_quant), ("act", m.a_quant)):
            for b in q.bits:
                rows.append({"layer": name, "kind": kind, "bits": b, "value": q.step_value(b)})
    return rows


