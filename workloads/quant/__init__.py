"""LSQ multi-bit quantizers, module swapping, policies, post-training quantization.

Names are imported on first use: ``workloads.quant.policy`` (plain Python) is what the search side
needs, and importing it must not pull torch into every Ray search worker (seconds per cold worker).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LsqQuantizer": ".lsq", "lsq_quantize": ".lsq",
    "QConv2d": ".modules", "QLinear": ".modules", "SwitchableBatchNorm2d": ".modules",
    "Policy": ".policy",
    **{n: ".swap" for n in ("draw_random_policies", "indicator_records", "quant_layers",
                            "quantize_model", "searchable_names", "set_full_precision", "set_policy", "set_random",
                            "set_uniform")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
