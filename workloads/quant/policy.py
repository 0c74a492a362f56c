"""A mixed-precision policy: one (weight bits, activation bits) pair per searchable layer."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    layers: tuple[str, ...]
    w_bits: tuple[int, ...]
    a_bits: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.layers) == len(self.w_bits) == len(self.a_bits)):
            raise ValueError(
                f"policy lengths differ: {len(self.layers)} layers, {len(self.w_bits)} weight bits, "
                f"{len(self.a_bits)} activation bits"
            )
        object.__setattr__(self, "w_bits", tuple(int(b) for b in self.w_bits))
        object.__setattr__(self, "a_bits", tuple(int(b) for b in self.a_bits))

    @classmethod
    def uniform(cls, layers, w: int, a: int | None = None) -> Policy:
        layers = tuple(layers)
        return cls(layers, (w,) * len(layers), ((a if a is not None else w),) * len(layers))

    def as_dict(self) -> dict[str, tuple[int, int]]:
        return {n: (w, a) for n, w, a in zip(self.layers, self.w_bits, self.a_bits)}

    @property
    def policy_id(self) -> str:
        """Stable id: a hash of the layer names and bits, so identical policies share it."""
        blob = json.dumps([self.layers, self.w_bits, self.a_bits], separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {"layers": list(self.layers), "w_bits": list(self.w_bits), "a_bits": list(self.a_bits)}

    @classmethod
    def from_json(cls, d: dict) -> Policy:
        return cls(tuple(d["layers"]), tuple(d["w_bits"]), tuple(d["a_bits"]))
