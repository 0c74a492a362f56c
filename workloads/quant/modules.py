"""Quantized drop-in layers: Conv2d / Linear with weight + input-activation LSQ quantizers, and a
switchable BatchNorm2d that keeps one set of statistics and affine parameters per bit-width."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .lsq import LsqQuantizer


class QuantMixin:
    """Shared by QConv2d and QLinear: two quantizers and the bits they are switched to."""

    w_quant: LsqQuantizer
    a_quant: LsqQuantizer

    def _init_quant(self, w_bits: Iterable[int], a_bits: Iterable[int]) -> None:
        self.w_quant = LsqQuantizer(w_bits, "weight")
        self.a_quant = LsqQuantizer(a_bits, "act")

    def set_bits(self, w_bits: int | None, a_bits: int | None) -> None:
        self.w_quant.set_bits(w_bits)
        self.a_quant.set_bits(a_bits)

    @property
    def bits(self) -> tuple[int | None, int | None]:
        return self.w_quant.active, self.a_quant.active


class QConv2d(QuantMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.a_quant(x), self.w_quant(self.weight), self.bias)


class QLinear(QuantMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quant(x), self.w_quant(self.weight), self.bias)


def quantized_copy(layer: nn.Module, w_bits: Iterable[int], a_bits: Iterable[int]) -> nn.Module:
    """A QConv2d/QLinear sharing nothing with ``layer`` but holding a copy of its parameters."""
    if isinstance(layer, nn.Conv2d):
        q = QConv2d(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
            device=layer.weight.device, dtype=layer.weight.dtype,
        )
    elif isinstance(layer, nn.Linear):
        q = QLinear(layer.in_features, layer.out_features, layer.bias is not None,
                    device=layer.weight.device, dtype=layer.weight.dtype)
    else:
        raise TypeError(f"cannot quantize {type(layer).__name__}")
    q.load_state_dict(layer.state_dict(), strict=False)
    q._init_quant(w_bits, a_bits)
    q.to(layer.weight.device)
    q.train(layer.training)
    return q


class SwitchableBatchNorm2d(nn.Module):
    """One BatchNorm2d per candidate bit-width plus the original (used at full precision).

    Every copy starts from the original's parameters and running statistics, so switching a
    pretrained network to any bit starts from the FP statistics and then learns its own.
    """

    def __init__(self, bn: nn.BatchNorm2d, bits: Iterable[int]):
        super().__init__()
        self.bits = tuple(int(b) for b in bits)
        self.fp = bn
        self.bn = nn.ModuleDict()
        for b in self.bits:
            copy = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                  bn.track_running_stats, device=_device_of(bn))
            copy.load_state_dict(bn.state_dict())
            copy.train(bn.training)
            self.bn[str(b)] = copy
        self.active: int | None = None

    def set_bits(self, bits: int | None) -> None:
        if bits is not None and bits not in self.bits:
            raise ValueError(f"bit-width {bits} has no BatchNorm here (candidates {self.bits})")
        self.active = bits

    def current(self) -> nn.BatchNorm2d:
        return self.fp if self.active is None else self.bn[str(self.active)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.current()(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, active={self.active}"


def _device_of(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")
