"""HeLoRA-Pad aggregation as small pure functions (HELORA_METHOD.md section 0, items 4-7).

Rules:
- A delta of rank r is padded to R with a linear padding operator, so padding deltas is exact.
- Per-update weights (``data``: n, ``rank``: n * (r/R)^beta) are normalised over the updates of
  one buffer WITHOUT the staleness factor; the staleness factor s(u) then really shrinks the step.
- ``coverage`` averages component i only over the updates whose rank covers i (weights n); the
  classifier head and other full tensors are averaged with weights n.
- Accumulation is streaming: the buffer keeps running sums, never the K deltas, so memory does not
  grow with K or with the number of clients.
- Every accumulator has ``add`` (one validated delta) and ``apply(adapter, eta)`` (the new global
  from the current one); the core owns versions, ledger and staleness (``Accumulator``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch

from helora.shared.lora_ops import LORA_A, LORA_B, Padding, is_lora_a, is_lora_b, pad_to_rank
from helora.shared.messages import Tensors


class Accumulator(Protocol):
    """One buffer's running aggregation (what the core needs from a strategy)."""

    count: int

    def add(self, delta: Tensors, rank: int, num_examples: int, staleness_factor: float) -> None:
        """Add one validated float32 delta of rank ``rank``."""

    def apply(self, adapter: Tensors, eta: float) -> Tensors:
        """The new global tensors (every name of ``adapter``), given the current global."""


class Weighting(StrEnum):
    DATA = "data"  # w ~ n (the reference code)
    RANK = "rank"  # w ~ n * (r/R)^beta (default)
    COVERAGE = "coverage"  # component i averaged over the updates that cover it, w ~ n


class Staleness(StrEnum):
    POLYNOMIAL = "polynomial"  # s(u) = (1 + u)^-a
    HINGE = "hinge"  # s(u) = 1 if u <= b else 1 / (a (u - b) + 1)
    CONSTANT = "constant"  # s(u) = 1: staleness weighting off


def staleness_weight(
    u: int, kind: Staleness | str = Staleness.POLYNOMIAL, a: float = 0.5, b: int = 4
) -> float:
    """The factor s(u) applied to an update that is ``u`` versions stale (u >= 0)."""
    if u < 0:
        raise ValueError(f"staleness must be >= 0, got {u}")
    kind = Staleness(kind)
    if kind is Staleness.POLYNOMIAL:
        return float((1.0 + u) ** -a)
    if kind is Staleness.HINGE:
        return 1.0 if u <= b else 1.0 / (a * (u - b) + 1.0)
    return 1.0


def update_weight(
    num_examples: int,
    rank: int,
    max_rank: int,
    weighting: Weighting | str = Weighting.RANK,
    beta: float = 1.0,
) -> float:
    """The unnormalised weight of one update (before staleness)."""
    weighting = Weighting(weighting)
    if weighting is Weighting.RANK:
        return float(num_examples) * (rank / max_rank) ** beta
    return float(num_examples)


def lora_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(A name, B name) of every adapted matrix among ``names``, sorted by the A name."""
    found = set(names)
    pairs = []
    for a in sorted(n for n in found if is_lora_a(n)):
        b = a.replace(LORA_A, LORA_B)
        if b not in found:
            raise ValueError(f"{a} has no matching {b}")
        pairs.append((a, b))
    return pairs


@dataclass
class PadAccumulator:
    """Running sums for one buffer of HeLoRA-Pad (or zero-pad FedAvg) aggregation."""

    max_rank: int
    padding: Padding = Padding.ZERO
    weighting: Weighting = Weighting.RANK
    beta: float = 1.0

    def __post_init__(self) -> None:
        self.padding = Padding(self.padding)
        self.weighting = Weighting(self.weighting)
        self._sums: Tensors = {}
        self._weight_sum = 0.0  # normaliser for padded LoRA tensors (data/rank weighting)
        self._full_weight_sum = 0.0  # normaliser for full tensors under coverage
        self._coverage = torch.zeros(self.max_rank, dtype=torch.float64)  # per-component n sums
        self.count = 0

    def add(self, delta: Tensors, rank: int, num_examples: int, staleness_factor: float) -> None:
        """Add one validated float32 delta of rank ``rank``."""
        if self.weighting is Weighting.COVERAGE:
            self._add_coverage(delta, rank, num_examples, staleness_factor)
        else:
            w = update_weight(num_examples, rank, self.max_rank, self.weighting, self.beta)
            # nothing to pad at rank R: use the delta itself (_sum_into never aliases it)
            padded = (
                delta if rank == self.max_rank else pad_to_rank(delta, self.max_rank, self.padding)
            )
            for name, t in padded.items():
                self._sum_into(name, t, staleness_factor * w)
            self._weight_sum += w
        self.count += 1

    def _add_coverage(self, delta: Tensors, rank: int, n: int, s: float) -> None:
        for name, t in delta.items():
            acc = self._sums.setdefault(name, torch.zeros(self._full_shape(name, t)))
            if is_lora_a(name):
                acc[:rank].add_(t, alpha=s * n)
            elif is_lora_b(name):
                acc[:, :rank].add_(t, alpha=s * n)
            else:
                acc.add_(t, alpha=s * n)
        self._coverage[:rank] += n
        self._full_weight_sum += n

    def _full_shape(self, name: str, t: torch.Tensor) -> tuple[int, ...]:
        if is_lora_a(name):
            return (self.max_rank, *t.shape[1:])
        if is_lora_b(name):
            return (t.shape[0], self.max_rank)
        return tuple(t.shape)

    def _sum_into(self, name: str, t: torch.Tensor, alpha: float) -> None:
        acc = self._sums.get(name)
        if acc is None:
            self._sums[name] = t.mul(alpha)
        else:
            acc.add_(t, alpha=alpha)

    def result(self) -> Tensors:
        """The aggregated delta at rank R: sum_k s_k w_k pad(D_k) / sum_k w_k (per component for
        coverage). Components no update covers get a zero delta."""
        if self.count == 0:
            raise ValueError("no update accumulated")
        if self.weighting is not Weighting.COVERAGE:
            return {n: t / self._weight_sum for n, t in self._sums.items()}
        cov = self._coverage.to(torch.float32)
        inv = torch.where(cov > 0, 1.0 / cov.clamp(min=1e-12), torch.zeros_like(cov))
        out: Tensors = {}
        for name, t in self._sums.items():
            if is_lora_a(name):
                out[name] = t * inv[:, None]
            elif is_lora_b(name):
                out[name] = t * inv[None, :]
            else:
                out[name] = t / self._full_weight_sum
        return out

    def apply(self, adapter: Tensors, eta: float) -> Tensors:
        """global + eta * result(): the FedBuff step of HeLoRA-Pad."""
        return {name: adapter[name] + eta * d for name, d in self.result().items()}
