"""Proposed hot-path changes for files the benchmark does not own, each measured by the bench.

``helora bench`` measures every item on its own (``bench_stages.proposal_gains``) and runs the
7B-class ingest with ``FastCore`` swapped in (the ``patched`` variants of ``bench_ingest``), so
each proposal comes with a measured gain. Decisions and results are unchanged (tests check it).

1. ``core.AggregatorCore._validate``: ``bool(torch.isfinite(t).all())`` allocates a bool tensor
   and is not vectorised well (~20 ms per 33.5 MB update on one thread). ``all_finite`` sums the
   tensor first (NaN and inf propagate through a sum; ~2 ms) and only falls back to the exact
   check when the sum is not finite (a NaN/inf, or an overflow of huge finite values).
2. ``strategies.PadAccumulator.add``: at rank R, ``pad_to_rank`` clones every tensor although
   nothing is padded; ``_sum_into`` only reads it, so the clone (~4-9 ms) can be skipped.
3. ``strategies.PadAccumulator.apply``: ``adapter[n] + eta * d`` after ``result()``
   (``t / weight_sum``) allocates three 33.5 MB sets per version;
   ``adapter[n].add_(sums[n], alpha=eta / weight_sum)`` allocates none (~30 -> ~9 ms). The
   global's tensors then change in place, so a ``GlobalAdapter`` kept from ``global_adapter()``
   must be encoded/checkpointed before the next apply (the service already does that).
4. ``guards.adapter_norm``: ``t.to(float64).pow(2).sum()`` makes two float64 copies per tensor
   (~9 ms per update); ``adapter_norm`` below uses float32 ``vector_norm`` (~1.5 ms). Measured
   in the stage table only (the ``patched`` runs keep the service's intake as it is).
5. Writers (``encode_update(level=...)``, a worker setting): zstd level -1 stores the literals of
   trained float weights raw (ratio 1.00 instead of 1.08 fp32 / 1.27 bf16), which makes
   decompression a memcpy (fp32 ~40 -> ~6 ms, bf16 ~16-22 -> ~2 ms per update).
6. The service loop (``bench_ingest``'s ``+thread`` variants): the per-delivery work in one
   worker thread while the connection thread keeps receiving; acks go back with
   ``add_callback_threadsafe``. Receiving and processing then overlap instead of adding up.
7. Environment: ``MALLOC_MMAP_THRESHOLD_`` (``bench_stages.malloc_probe``): glibc mmaps and
   unmaps every buffer above its threshold (at most 32 MiB), so each 33.5 MB message pays its
   page faults again.
"""

from __future__ import annotations

import math

import torch

from helora.aggregator.core import AggregatorCore
from helora.aggregator.guards import adapter_norm as exact_adapter_norm
from helora.aggregator.strategies import PadAccumulator, Weighting, update_weight
from helora.shared.messages import Tensors


def all_finite(t: torch.Tensor) -> bool:
    """Exactly ``bool(torch.isfinite(t).all())``, ~10x faster when the answer is True."""
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def adapter_norm(tensors: Tensors) -> float:
    """guards.adapter_norm (float64 copies of every tensor) via float32 ``vector_norm``, which
    allocates nothing; falls back to the exact float64 path if the float32 sum overflows."""
    total = 0.0
    for t in tensors.values():
        total += float(torch.linalg.vector_norm(t.detach())) ** 2
    return math.sqrt(total) if math.isfinite(total) else exact_adapter_norm(tensors)


class FastPadAccumulator(PadAccumulator):
    def add(self, delta: Tensors, rank: int, num_examples: int, staleness_factor: float) -> None:
        if self.weighting is Weighting.COVERAGE or rank != self.max_rank:
            super().add(delta, rank, num_examples, staleness_factor)
            return
        w = update_weight(num_examples, rank, self.max_rank, self.weighting, self.beta)
        for name, t in delta.items():  # nothing to pad at rank R: no clone
            self._sum_into(name, t, staleness_factor * w)
        self._weight_sum += w
        self.count += 1

    def apply(self, adapter: Tensors, eta: float) -> Tensors:
        """global + eta * result(), in place: 1 / sum(w) folded into one add_, no temporaries."""
        if self.weighting is Weighting.COVERAGE:
            return {n: adapter[n].add_(d, alpha=eta) for n, d in self.result().items()}
        scale = eta / self._weight_sum
        return {n: adapter[n].add_(total, alpha=scale) for n, total in self._sums.items()}


class FastCore(AggregatorCore):
    """AggregatorCore with proposals 2-3 (proposal 1, the finite check, is in the core now);
    decisions and results are identical."""

    def _new_accumulator(self) -> PadAccumulator:
        c = self.config
        return FastPadAccumulator(self.spec.max_rank, c.padding, c.weighting, c.beta)
