"""Splitting a training pool across federated clients: IID and Dirichlet label skew.

``partition_indices`` returns, for one call, disjoint index lists that together cover every
index of ``labels``; each list is sorted. The same arguments always give the same lists.
"""

from __future__ import annotations

import math
import operator
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from helora.shared.errors import ConfigError

if TYPE_CHECKING:
    from helora.worker.data import FederatedData, TextDataset

SCHEMES = ("iid", "dirichlet")
MAX_DIRICHLET_TRIES = 100


def parse_partition(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``: client I of N."""
    hint = 'write it as I/N with 0 <= I < N, e.g. "0/4" for the first of four clients'
    parts = str(spec).strip().split("/")
    if len(parts) != 2:
        raise ConfigError(f"partition {spec!r} is not of the form I/N; {hint}")
    try:
        index, total = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"partition {spec!r}: I and N must be integers; {hint}") from None
    if total < 1:
        raise ConfigError(f"partition {spec!r}: the number of clients N must be >= 1; {hint}")
    if not 0 <= index < total:
        raise ConfigError(
            f"partition {spec!r}: client index {index} is outside 0..{total - 1}; {hint}"
        )
    return index, total


def client_partition(
    data: FederatedData,
    index: int,
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> TextDataset:
    """Client ``index`` of ``num_clients``: its share of ``data.train`` (see partition_indices)."""
    parts = partition_indices(data.train.labels, num_clients, scheme=scheme, alpha=alpha, seed=seed)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(parts):
        raise ConfigError(f"client index {index!r} is outside 0..{len(parts) - 1}")
    return data.train.subset(parts[index])


def partition_indices(
    labels: Sequence[int],
    num_clients: int,
    *,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Split ``range(len(labels))`` into ``num_clients`` disjoint, covering, sorted lists.

    ``iid``: a seeded shuffle cut into near-equal contiguous chunks (sizes differ by <= 1).
    ``dirichlet``: for each class, proportions over clients are drawn from Dir(alpha) and that
    class's (shuffled) indices are cut accordingly; the whole draw is repeated until every
    client holds at least ``min_size`` examples (at most ``MAX_DIRICHLET_TRIES`` draws).
    Smaller alpha means stronger label skew.
    """
    try:
        k = operator.index(num_clients)
    except TypeError:
        k = 0
    if k < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    num_clients = k
    if min_size < 0:
        raise ConfigError(f"min_size must be >= 0, got {min_size}")
    name = str(scheme).strip().lower()
    n = len(labels)
    if n < num_clients * min_size:
        raise ConfigError(
            f"cannot give {num_clients} clients at least {min_size} example(s) each from only "
            f"{n} examples; use fewer clients or a larger training pool (max_train)"
        )
    if name == "iid":
        return _iid(n, num_clients, seed)
    if name == "dirichlet":
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            a = math.nan
        if not (math.isfinite(a) and a > 0):
            raise ConfigError(
                f"Dirichlet alpha must be a finite number > 0, got {alpha!r} "
                "(e.g. 0.1 = strong label skew, 100 = nearly IID)"
            )
        return _dirichlet(labels, num_clients, a, seed, min_size)
    raise ConfigError(f"unknown partition scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def _iid(n: int, num_clients: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    base, extra = divmod(n, num_clients)
    parts, start = [], 0
    for i in range(num_clients):
        size = base + (1 if i < extra else 0)
        parts.append(sorted(order[start : start + size]))
        start += size
    return parts


def _dirichlet(
    labels: Sequence[int], num_clients: int, alpha: float, seed: int, min_size: int
) -> list[list[int]]:
    label_arr = np.asarray(labels, dtype=np.int64)
    classes = np.unique(label_arr)
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(label_arr == c)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return [sorted(p) for p in parts]
    raise ConfigError(
        f"Dirichlet(alpha={alpha}) partition of {len(label_arr)} examples over {num_clients} "
        f"clients left a client with {smallest} < min_size={min_size} examples after "
        f"{MAX_DIRICHLET_TRIES} draws; raise alpha, use fewer clients or lower min_size"
    )
