"""What a federation's adapter looks like: names and shapes at the max rank R, and a fingerprint.

The aggregator checks every update against this spec (names, and shapes at the update's rank),
and clients and aggregator compare fingerprints so that an update trained on another base model,
target-module set, label count or R is rejected instead of silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from helora.shared.lora_ops import is_lora_a, is_lora_b, rank_of
from helora.shared.messages import Tensors


@dataclass(frozen=True)
class AdapterSpec:
    model_id: str  # the base model's name or path, as given by the user (informational)
    max_rank: int  # R
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape at rank R
    lora_alpha: float  # alpha at rank R; every client uses scale alpha / R (method item 1)

    @classmethod
    def from_tensors(cls, model_id: str, tensors: Tensors, lora_alpha: float) -> AdapterSpec:
        return cls(
            model_id=model_id,
            max_rank=rank_of(tensors),
            shapes={n: tuple(t.shape) for n, t in sorted(tensors.items())},
            lora_alpha=float(lora_alpha),
        )

    @classmethod
    def from_rank_adapter(
        cls, model_id: str, tensors: Tensors, max_rank: int, lora_alpha: float
    ) -> AdapterSpec:
        """The spec at rank R seen from a client's adapter of a lower rank."""
        rank = rank_of(tensors)
        shapes: dict[str, tuple[int, ...]] = {}
        for n, t in sorted(tensors.items()):
            if is_lora_a(n):
                shapes[n] = (max_rank, *t.shape[1:])
            elif is_lora_b(n):
                shapes[n] = (t.shape[0], max_rank)
            else:
                shapes[n] = tuple(t.shape)
        if rank > max_rank:
            raise ValueError(f"rank {rank} exceeds the max rank {max_rank}")
        return cls(
            model_id=model_id, max_rank=max_rank, shapes=shapes, lora_alpha=float(lora_alpha)
        )

    def shape_at_rank(self, name: str, rank: int) -> tuple[int, ...]:
        shape = self.shapes[name]
        if is_lora_a(name):
            return (rank, *shape[1:])
        if is_lora_b(name):
            return (shape[0], rank)
        return shape

    def alpha_at_rank(self, rank: int) -> float:
        """peft lora_alpha for a client of this rank so that its scale equals alpha / R."""
        return self.lora_alpha * rank / self.max_rank

    @property
    def fingerprint(self) -> str:
        """Depends on the tensor names, shapes, R and alpha; not on the model path's spelling."""
        doc = {
            "max_rank": self.max_rank,
            "lora_alpha": self.lora_alpha,
            "shapes": {n: list(s) for n, s in sorted(self.shapes.items())},
        }
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        return f"sha256:{digest[:32]}"
