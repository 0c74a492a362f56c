"""Post-training quantization: asymmetric per-tensor fake quantization, MixQuant's QE table and its
bit selection, and a PTQ copy of an FP model for evaluation.

Asymmetric per-tensor (MixQuant): xmin = min(W, 0), xmax = max(W, 0), delta = (xmax - xmin)/(2^b - 1),
z = round(-xmin/delta), q = clamp(round(W/delta) + z, 0, 2^b - 1), W' = (q - z) * delta.
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

QE_BITS = (8, 7, 6, 5, 4, 3, 2)


def asym_quantize(x: torch.Tensor, bits: int, xmin: torch.Tensor | None = None,
                  xmax: torch.Tensor | None = None) -> torch.Tensor:
    xmin = torch.clamp(x.min() if xmin is None else xmin, max=0.0)
    xmax = torch.clamp(x.max() if xmax is None else xmax, min=0.0)
    levels = 2**bits - 1
    delta = (xmax - xmin) / levels
    if float(delta) == 0.0:
        return x.clone()
    z = torch.round(-xmin / delta)
    q = torch.clamp(torch.round(x / delta) + z, 0, levels)
    return (q - z) * delta


def quant_error(w: torch.Tensor, bits: int) -> float:
    return float(torch.mean((w - asym_quantize(w, bits)) ** 2))


@torch.no_grad()
def qe_table(model: nn.Module, layers: Iterable[str], bits: Sequence[int] = QE_BITS) -> dict[str, dict[int, float]]:
    """QE_b = MSE(W, dequant(quant_asym(W, b))) per named layer and bit. Computed once per model."""
    mods = dict(model.named_modules())
    return {name: {b: quant_error(mods[name].weight.detach().float(), b) for b in bits} for name in layers}


def mixquant_bits(table: Mapping[str, Mapping[int, float]], qem: float) -> dict[str, int]:
    """Per layer, the smallest bit b whose QE_b <= QEM * QE_8 (8 if none is)."""
    if qem <= 0:
        raise ValueError(f"QEM must be positive, got {qem}")
    out = {}
    for name, qe in table.items():
        ok = [b for b in qe if qe[b] <= qem * qe[8]]
        out[name] = min(ok) if ok else 8
    return out


class _ActFakeQuant(nn.Module):
    """Observes min/max while calibrating, then fake-quantizes a layer's input asymmetrically."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.calibrating = True
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def __call__(self, module, inputs):
        x = inputs[0]
        if self.calibrating:
            self.lo = torch.minimum(self.lo, x.detach().min())
            self.hi = torch.maximum(self.hi, x.detach().max())
            return None
        return (asym_quantize(x, self.bits, self.lo, self.hi),) + tuple(inputs[1:])


@torch.no_grad()
def ptq_model(fp_model: nn.Module, weight_bits: Mapping[str, int], act_bits: int | None,
              calib_batches: Iterable[torch.Tensor] = (), default_bits: int = 8) -> nn.Module:
    """A copy of ``fp_model`` with every Conv2d/Linear weight quantized (``weight_bits`` per named
    layer, ``default_bits`` for the others) and, if ``act_bits``, inputs fake-quantized with ranges
    calibrated on ``calib_batches``."""
    model = copy.deepcopy(fp_model).eval()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    unknown = set(weight_bits) - {n for n, _ in targets}
    if unknown:
        raise ValueError(f"weight bits given for unknown layers {sorted(unknown)}")
    for name, m in targets:
        m.weight.copy_(asym_quantize(m.weight, weight_bits.get(name, default_bits)))
    if act_bits:
        observers = []
        for _, m in targets:
            obs = _ActFakeQuant(act_bits)
            m.register_forward_pre_hook(obs)
            observers.append(obs)
        device = next(model.parameters()).device
        seen = 0
        for x in calib_batches:
            model(x.to(device))
            seen += 1
        if seen == 0:
            raise ValueError("activation PTQ needs at least one calibration batch")
        for obs in observers:
            obs.calibrating = False
    return model
