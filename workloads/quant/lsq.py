"""LSQ quantizers that hold one learnable step size per candidate bit-width (LIMPQ).

A quantizer is switched to one of its candidate bits (or to ``None``: full precision) and then
quantizes with that bit's own step size. The step sizes are LIMPQ's importance indicators.

Forward, per LIMPQ / LSQ:
    s  = clamp(s_b, 1e-5)
    g  = 1 / sqrt(q_max * numel(x))
    s' = s*g + (s - s*g).detach()          # value s, gradient scaled by g
    q  = round_ste(clamp(x / s', q_min, q_max)) * s'
computed by ``_LsqFunction`` with those gradients in closed form (fused into one kernel each way with
MPQ_COMPILE_QUANT=1); ``tests/test_quant.py`` checks it against the autograd formulation above.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

MIN_STEP = 1e-5


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _lsq_forward(x: torch.Tensor, s: torch.Tensor, lo, hi) -> torch.Tensor:
    return torch.clamp(x.float() / s, lo, hi).round() * s


def _lsq_backward(grad: torch.Tensor, x: torch.Tensor, s: torch.Tensor, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    xs = x.float() / s
    c = torch.clamp(xs, lo, hi)
    grad_x = grad * (c == xs)  # straight through inside the range, zero where clamped
    # d(round(c)*s)/ds with a straight-through round: round(c) - x/s inside the range, round(c) outside.
    grad_s = (grad * c.round()).sum() - (grad_x * xs).sum()
    return grad_x.to(x.dtype), grad_s


_KERNELS: dict[str, object] = {}


def _kernels():
    """With MPQ_COMPILE_QUANT=1 the forward and the backward each fuse into one kernel (torch.compile,
    dynamic shapes); eagerly each is a few passes over the activation. Opt-in until measured on a GPU:
    bench/bench_gpu.py compares both."""
    if os.environ.get("MPQ_COMPILE_QUANT", "0") != "1":
        return _lsq_forward, _lsq_backward, False
    if not _KERNELS:
        _KERNELS.update(fwd=torch.compile(_lsq_forward, dynamic=True), bwd=torch.compile(_lsq_backward, dynamic=True))
    return _KERNELS["fwd"], _KERNELS["bwd"], True


_BOUNDS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _bounds(q_min: int, q_max: int, device: torch.device, compiled: bool):
    """The clamp bounds: Python numbers eagerly; for the compiled kernels 0-dim device tensors made
    once per device, so the kernels are not specialised (and recompiled) per bit-width."""
    if not compiled:
        return float(q_min), float(q_max)
    key = (q_min, q_max, device)
    if key not in _BOUNDS:
        _BOUNDS[key] = (torch.tensor(float(q_min), device=device), torch.tensor(float(q_max), device=device))
    return _BOUNDS[key]


class _LsqFunction(torch.autograd.Function):
    """LSQ's forward and its straight-through gradients in closed form (the values autograd derives
    from ``round_ste(clamp(x / s', q_min, q_max)) * s'``); saves only the input and the step."""

    @staticmethod
    def forward(ctx, x, s, q_min, q_max, g):
        fwd, _, compiled = _kernels()
        lo, hi = _bounds(q_min, q_max, x.device, compiled)
        ctx.save_for_backward(x, s)
        ctx.bounds, ctx.g = (q_min, q_max), g
        return fwd(x, s, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        _, bwd, compiled = _kernels()
        lo, hi = _bounds(*ctx.bounds, x.device, compiled)
        grad_x, grad_s = bwd(grad, x, s, lo, hi)
        return grad_x, (grad_s * ctx.g).reshape(s.shape), None, None, None


def lsq_quantize(x: torch.Tensor, step: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Always in fp32, also under bf16 autocast (as LIMPQ): x/s and its rounding in bf16 would put
    values on another grid. The output is fp32; the conv/linear that consumes it may still run in bf16.
    The step's gradient is scaled by g = 1/sqrt(q_max * numel(x)) (LSQ)."""
    q_min, q_max = qrange(bits, signed)
    with torch.autocast(x.device.type, enabled=False):
        s = step.float().clamp(min=MIN_STEP)
        return _LsqFunction.apply(x, s, q_min, q_max, 1.0 / math.sqrt(q_max * x.numel()))


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


class LsqQuantizer(nn.Module):
    """Per-tensor LSQ quantizer with one step size per candidate bit-width.

    kind="weight": signed, step initialised at first use from the tensor's statistics
    (max(|mu-3sigma|, |mu+3sigma|) / 2^(b-1)).
    kind="act": unsigned unless the first batch it initialises on holds negative values (the
    network input, MobileNetV2's linear bottlenecks); step initialised lazily at the first
    *training* batch seen at each bit as 2*mean|x|/sqrt(q_max), averaged over data-parallel ranks.
    """

    def __init__(self, bits: Iterable[int], kind: str):
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"quantizer kind must be 'weight' or 'act', got {kind!r}")
        self.bits = tuple(int(b) for b in bits)
        if not self.bits or len(set(self.bits)) != len(self.bits):
            raise ValueError(f"candidate bits must be distinct and non-empty, got {self.bits}")
        self.kind = kind
        self.step = nn.ParameterDict({str(b): nn.Parameter(torch.tensor(1.0)) for b in self.bits})
        # Buffers, so they travel with state_dict checkpoints and are broadcast like other state.
        self.register_buffer("initialized", torch.zeros(len(self.bits), dtype=torch.bool))
        self.register_buffer("signed_flag", torch.tensor(kind == "weight"))
        self.register_buffer("signed_decided", torch.tensor(kind == "weight"))
        self.active: int | None = None
        # Host copies of the two buffers the forward branches on, read once after construction or a
        # state-dict load: reading the buffers themselves would be a device sync per quantizer per pass.
        self._ready: list[bool] | None = None
        self._signed: bool | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = self._signed = None

    @property
    def signed(self) -> bool:
        if self._signed is None:
            self._signed = bool(self.signed_flag)
        return self._signed

    def set_bits(self, bits: int | None) -> None:
        if bits is not None and bits not in self.bits:
            raise ValueError(f"bit-width {bits} is not a candidate of this quantizer {self.bits}")
        self.active = bits

    def step_value(self, bits: int) -> float:
        return float(self.step[str(bits)].detach().clamp(min=MIN_STEP))

    @torch.no_grad()
    def _init_step(self, x: torch.Tensor, bits: int) -> None:
        idx = self.bits.index(bits)
        if self.kind == "weight":
            mu, sigma = x.mean(), x.std()
            val = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (bits - 1)
        else:
            if not bool(self.signed_decided):
                has_neg = _all_reduce_mean((x.min() < 0).float().reshape(1))
                self._signed = bool(has_neg.item() > 0)
                self.signed_flag.fill_(self._signed)
                self.signed_decided.fill_(True)
            _, q_max = qrange(bits, self.signed)
            val = _all_reduce_mean(2 * x.float().abs().mean().reshape(1))[0] / math.sqrt(q_max)
        self.step[str(bits)].data.copy_(val.float().clamp(min=MIN_STEP))
        self.initialized[idx] = True
        if self._ready is not None:
            self._ready[idx] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.active
        if bits is None:
            return x
        idx = self.bits.index(bits)
        if self._ready is None:
            self._ready = self.initialized.tolist()
        if not self._ready[idx]:
            # Weights: any forward may initialise (statistics do not depend on the data).
            # Activations: only a training batch, as in LIMPQ; eval before init stays FP-safe.
            if self.kind == "weight" or self.training:
                self._init_step(x.detach(), bits)
            else:
                raise RuntimeError(
                    "activation quantizer evaluated at a bit-width it has never been trained or "
                    "calibrated at; run a training or calibration batch first"
                )
        return lsq_quantize(x, self.step[str(bits)], bits, self.signed)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, bits={self.bits}, active={self.active}"
