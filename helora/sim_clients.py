"""Simulated clients: ranks, speeds, stragglers and availability on the virtual clock."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from helora.shared.messages import GlobalAdapter, Tensors

if TYPE_CHECKING:
    from helora.sim_config import SimConfig


@dataclass
class SimClient:
    index: int
    client_id: str
    rank: int
    base_step_time: float  # virtual seconds per local step, before jitter
    straggler: bool
    num_examples: int
    data: Any = None  # a TextDataset (real runs) or anything the injected trainer understands
    updates: int = 0  # local trainings started so far (also the train_local ``step``)
    _periods: list[tuple[float, float]] = field(default_factory=list)  # online [start, end)
    _rng: random.Random | None = None

    # Availability: online periods are generated lazily and cover [0, horizon).
    def _extend(self, t: float, availability: float, mean_online: float) -> None:
        if availability >= 1.0:
            if not self._periods:
                self._periods.append((0.0, math.inf))
            return
        assert self._rng is not None
        mean_off = mean_online * (1.0 - availability) / availability
        if not self._periods:
            self._periods.append((0.0, self._rng.expovariate(1.0 / mean_online)))
        while self._periods[-1][1] <= t:
            end = self._periods[-1][1]
            start = end + self._rng.expovariate(1.0 / mean_off)
            self._periods.append((start, start + self._rng.expovariate(1.0 / mean_online)))

    def next_online(self, t: float, availability: float, mean_online: float) -> float:
        """``t`` if the client is online at ``t``, else the start of its next online period."""
        self._extend(t, availability, mean_online)
        for start, end in self._periods:
            if t < end:
                return max(t, start)
        raise AssertionError("unreachable: _extend covers t")  # pragma: no cover


def make_clients(
    cfg: SimConfig, sizes: Sequence[int], data: Sequence[Any] | None = None
) -> list[SimClient]:
    """Clients with cycled ranks, seeded stragglers and availability patterns."""
    rng = random.Random(f"helora-sim/{cfg.seed}/clients")
    n_strag = round(cfg.straggler_fraction * cfg.num_clients)
    stragglers = set(rng.sample(range(cfg.num_clients), n_strag)) if n_strag else set()
    out = []
    for k in range(cfg.num_clients):
        rank = cfg.ranks[k % len(cfg.ranks)]
        ref = cfg.speed_ref_rank or cfg.R
        step = cfg.step_time * (rank / ref) ** cfg.rank_speed_exponent
        if k in stragglers:
            step *= cfg.straggler_factor
        out.append(
            SimClient(
                index=k,
                client_id=f"client-{k}",
                rank=rank,
                base_step_time=step,
                straggler=k in stragglers,
                num_examples=int(sizes[k]),
                data=None if data is None else data[k],
                _rng=random.Random(f"helora-sim/{cfg.seed}/avail/{k}"),
            )
        )
    return out


# trainer(client, received adapter at the client's rank, round index) -> (delta, metrics)
Trainer = Callable[[SimClient, Tensors, int], tuple[Tensors, dict[str, float]]]
# evaluator(global adapter, ranks) -> {rank: accuracy}
Evaluator = Callable[[GlobalAdapter, Sequence[int]], dict[int, float]]
# (global, slot weights) -> accuracy of the weighted mean of the slots' logits (KD)
EnsembleEvaluator = Callable[[GlobalAdapter, dict[int, float]], float]


@dataclass
class _Job:
    client: SimClient
    base_version: int
    received: Tensors
    round_index: int
    start: float
    finish: float  # training done
    deliver: float  # arrival at the aggregator (>= finish; later if offline)


def _uid(cfg: SimConfig, client: SimClient, n: int) -> str:
    return hashlib.blake2b(
        f"{cfg.seed}/{client.client_id}/{n}".encode(), digest_size=16
    ).hexdigest()
