"""Synthetic adapters for `helora bench`: the right names and shapes, trained-looking values.

Two workloads (PERF_NOTES.md):
- ``small``: all-MiniLM-L6-v2 at rank 8: 6 layers x (query, value), 384x384, plus the 2x384 head
  (and its bias): 74,498 float32 values, 298 KB.
- ``large``: a 7B-class adapter: 32 layers x (q_proj, v_proj), 4096x4096 at rank 16, no head:
  8,388,608 float32 values, 33.5 MB.

Values are random normal (never zeros): zstd gains only ~8% on them, as on real trained deltas.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch

from helora.shared.lora_ops import is_lora_a
from helora.shared.messages import AdapterUpdate, Tensors
from helora.shared.spec import AdapterSpec


@dataclass(frozen=True)
class AdapterShape:
    """One synthetic adapter family: ``layers`` x ``modules`` adapted ``dim`` x ``dim`` matrices."""

    name: str
    layers: int
    modules: tuple[str, ...]
    dim: int
    rank: int  # R
    prefix: str  # peft key prefix of one layer's attention block, with {i} for the layer
    head_labels: int = 0  # 0: no classifier head

    def names(self) -> list[str]:
        out = []
        for i in range(self.layers):
            for m in self.modules:
                base = f"{self.prefix.format(i=i)}.{m}"
                out += [f"{base}.lora_A.weight", f"{base}.lora_B.weight"]
        if self.head_labels:
            out += ["base_model.model.classifier.weight", "base_model.model.classifier.bias"]
        return out

    def shape(self, name: str, rank: int) -> tuple[int, ...]:
        if name.endswith("classifier.weight"):
            return (self.head_labels, self.dim)
        if name.endswith("classifier.bias"):
            return (self.head_labels,)
        return (rank, self.dim) if is_lora_a(name) else (self.dim, rank)

    def float32_bytes(self, rank: int | None = None) -> int:
        r = self.rank if rank is None else rank
        return 4 * sum(_numel(self.shape(n, r)) for n in self.names())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


SMALL = AdapterShape(
    name="small",
    layers=6,
    modules=("query", "value"),
    dim=384,
    rank=8,
    prefix="base_model.model.bert.encoder.layer.{i}.attention.self",
    head_labels=2,
)
LARGE = AdapterShape(
    name="large",
    layers=32,
    modules=("q_proj", "v_proj"),
    dim=4096,
    rank=16,
    prefix="base_model.model.model.layers.{i}.self_attn",
)
SHAPES = {"small": SMALL, "large": LARGE}


def synthetic_tensors(shape: AdapterShape, rank: int, seed: int, scale: float = 1.0) -> Tensors:
    """Trained-looking values: A ~ N(0, 0.02), B ~ N(0, 0.002), head ~ N(0, 0.05), times scale."""
    g = torch.Generator().manual_seed(seed)
    out: Tensors = {}
    for name in shape.names():
        std = 0.02 if is_lora_a(name) else 0.05 if "classifier" in name else 0.002
        out[name] = torch.randn(shape.shape(name, rank), generator=g).mul_(std * scale)
    return out


def initial_global(shape: AdapterShape, seed: int = 0) -> Tensors:
    return synthetic_tensors(shape, shape.rank, seed)


def spec_for(shape: AdapterShape) -> AdapterSpec:
    return AdapterSpec.from_tensors(f"synthetic-{shape.name}", initial_global(shape), 16.0)


def synthetic_update(
    shape: AdapterShape,
    spec: AdapterSpec,
    *,
    client_id: str,
    rank: int | None = None,
    base_version: int = 0,
    tensors: Tensors | None = None,
    seed: int = 1,
) -> AdapterUpdate:
    """A delta at ``rank`` (default R); pass ``tensors`` to reuse values across updates."""
    r = shape.rank if rank is None else rank
    return AdapterUpdate(
        update_id=uuid.uuid4().hex,
        client_id=client_id,
        rank=r,
        base_version=base_version,
        num_examples=100,
        fingerprint=spec.fingerprint,
        tensors=tensors if tensors is not None else synthetic_tensors(shape, r, seed, 0.1),
        metrics={"train_loss": 0.5},
    )
