"""Post-training quantization: asymmetric per-tensor fake quantization, MixQuant's QE table and its
bit selection, and a PTQ copy of an FP model for evaluation.

Asymmetric per-tensor (MixQuant): xmin = min(W, 0), xmax = max(W, 0), delta = (xmax - xmin)/(2^b - 1),
z = round(-xmin/delta), q = clamp(round(W/delta) + z, 0, 2^b - 1), W' = (q - z) * delta.
Activations use the same quantizer with a range (min/max) observed on a few calibration batches.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

QE_BITS = (8, 7, 6, 5, 4, 3, 2)


def asym_quantize(x: torch.Tensor, bits: int, xmin: torch.Tensor | None = None,
                  xmax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` to ``bits`` with an asymmetric per-tensor grid over
    [min(xmin, 0), max(xmax, 0)] (zero is exactly representable); values outside are clamped."""
    xmin = torch.clamp(x.min() if xmin is None else torch.as_tensor(xmin, device=x.device), max=0.0)
    xmax = torch.clamp(x.max() if xmax is None else torch.as_tensor(xmax, device=x.device), min=0.0)
    levels = 2**bits - 1
    delta = (xmax - xmin) / levels
    if float(delta) == 0.0:  # an all-zero tensor: nothing to quantize
        return x.clone()
    z = torch.round(-xmin / delta)
    q = torch.clamp(torch.round(x / delta) + z, 0, levels)
    return (q - z) * delta


def quant_error(w: torch.Tensor, bits: int) -> float:
    return float(torch.mean((w - asym_quantize(w, bits)) ** 2))


@torch.no_grad()
def qe_table(model: nn.Module, layers: Iterable[str], bits: Sequence[int] = QE_BITS) -> dict[str, dict[int, float]]:
    """QE_b = MSE(W, dequant(quant_asym(W, b))) per named layer and bit. Computed once per model.
    The range of each weight does not depend on b, so it is found once per layer."""
    mods = dict(model.named_modules())
    out: dict[str, dict[int, float]] = {}
    for name in layers:
        w = mods[name].weight.detach().float()
        lo, hi = w.min(), w.max()
        out[name] = {int(b): float(torch.mean((w - asym_quantize(w, int(b), lo, hi)) ** 2)) for b in bits}
    return out


def mixquant_bits(table: Mapping[str, Mapping[int, float]], qem: float) -> dict[str, int]:
    """Per layer, the smallest bit b whose QE_b <= QEM * QE_8 (8 if none is)."""
    if qem <= 0:
        raise ValueError(f"QEM must be positive, got {qem}")
    out = {}
    for name, qe in table.items():
        ok = [b for b in qe if qe[b] <= qem * qe[8]]
        out[name] = min(ok) if ok else 8
    return out


class _ActFakeQuant:
    """Forward pre-hook on one layer: observes its input's min/max while calibrating, then
    fake-quantizes the input asymmetrically to ``bits`` over that range."""

    def __init__(self, bits: int):
        self.bits = bits
        self.calibrating = True
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, module, inputs):
        x = inputs[0]
        if self.calibrating:
            lo, hi = x.detach().min(), x.detach().max()
            self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
            self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
            return None
        if self.lo is None:  # the layer never ran during calibration (unused branch): leave it FP
            return None
        return (asym_quantize(x, self.bits, self.lo, self.hi),) + tuple(inputs[1:])


def _per_layer(bits: int | Mapping[str, int] | None, names: Sequence[str], default: int, what: str) -> dict[str, int]:
    if bits is None:
        return {}
    if isinstance(bits, Mapping):
        unknown = set(bits) - set(names)
        if unknown:
            raise ValueError(f"{what} bits given for unknown layers {sorted(unknown)}")
        return {n: int(bits.get(n, default)) for n in names}
    return {n: int(bits) for n in names}


@torch.no_grad()
def ptq_model(fp_model: nn.Module, weight_bits: Mapping[str, int], act_bits: int | Mapping[str, int] | None,
              calib_batches: Iterable[torch.Tensor] = (), default_bits: int = 8) -> nn.Module:
    """A copy of ``fp_model`` (eval mode) with every Conv2d/Linear weight quantized asymmetrically per
    tensor (``weight_bits`` per named layer, ``default_bits`` for the others) and, unless ``act_bits``
    is None, every Conv2d/Linear input fake-quantized: ``act_bits`` is one width for all layers or a
    per-layer mapping (``default_bits`` for layers it does not name). Activation ranges are the
    min/max over ``calib_batches`` (input tensors, or (input, target) pairs) run through the
    weight-quantized model, so they see the activations the quantized model really produces."""
    model = copy.deepcopy(fp_model).eval()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = [n for n, _ in targets]
    wb = _per_layer(dict(weight_bits), names, default_bits, "weight")
    for name, m in targets:
        m.weight.copy_(asym_quantize(m.weight, wb.get(name, default_bits)))
    ab = _per_layer(act_bits, names, default_bits, "activation")
    if ab:
        observers = []
        for name, m in targets:
            obs = _ActFakeQuant(ab[name])
            m.register_forward_pre_hook(obs)
            observers.append(obs)
        device = next(model.parameters()).device
        seen = 0
        for x in calib_batches:
            if isinstance(x, (tuple, list)):
                x = x[0]
            model(x.to(device))
            seen += 1
        if seen == 0:
            raise ValueError("activation PTQ needs at least one calibration batch")
        for obs in observers:
            obs.calibrating = False
    return model
