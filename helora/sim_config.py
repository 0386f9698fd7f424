"""The configuration of one simulated federation (helora simulate, helora study)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from helora.aggregator.core import PadConfig
from helora.aggregator.strategies import Staleness, Weighting
from helora.shared.errors import ConfigError
from helora.shared.lora_ops import Padding

MODES = ("async", "sync")
DEFAULT_DATA = "../shared/data/sst2"


@dataclass(frozen=True)
class SimConfig:
    """One simulated federation; every field is JSON-able (the study hashes them into keys)."""

    method: str = "pad"  # a name from aggregator.methods.METHODS
    data: str = DEFAULT_DATA
    mode: str = "async"  # async | sync
    seed: int = 0
    num_clients: int = 6
    ranks: tuple[int, ...] = (2, 4, 8)  # cycled over the clients
    max_rank: int | None = None  # R; default max(ranks)
    scheme: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration
    local_steps: int = 20  # E
    batch_size: int = 16
    lr: float = 2e-3
    buffer_size: int = 3  # K (async); sync uses K = number of participants
    max_versions: int = 8  # stop after this many versions
    time_budget: float | None = None  # or stop at this virtual time
    # speed: step_time(k) = step_time * (r_k / R) ** rank_speed_exponent * (straggler_factor if
    # k is a straggler), times a per-update uniform jitter in [1 - jitter, 1 + jitter]
    step_time: float = 1.0
    rank_speed_exponent: float = 0.5
    speed_ref_rank: int | None = None  # the rank whose step takes step_time; default R
    straggler_fraction: float = 0.34
    straggler_factor: float = 3.0
    jitter: float = 0.1
    # availability: alternating exponential online/offline periods with this long-run online
    # fraction; 1.0 = always online. mean_online is the mean online period (virtual seconds).
    availability: float = 1.0
    mean_online: float = 150.0
    # aggregation (PadConfig) settings
    padding: str = "zero"
    weighting: str = "rank"
    beta: float = 1.0
    staleness: str = "polynomial"
    staleness_a: float = 0.5
    max_staleness: int = 8
    server_lr: float = 1.0
    method_options: tuple[tuple[str, Any], ...] = ()  # extra make_core kwargs (JSON-able)
    # data and model scale
    max_train: int = 6000
    eval_size: int = 400
    public_size: int = 500
    min_client_size: int = 16
    max_length: int = 48
    lora_alpha: float = 16.0
    model: str | None = None  # None: the packaged all-MiniLM-L6-v2
    eval_every: int = 1  # evaluate the global every this many versions
    target: float | None = None  # accuracy for virtual_time_to_target
    stop_at_target: bool = False  # end the run at the first evaluation reaching the target
    threads: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        opts = self.method_options
        items = opts.items() if isinstance(opts, dict) else opts
        object.__setattr__(self, "method_options", tuple(sorted((str(k), v) for k, v in items)))
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.num_clients < 1 or not self.ranks or min(self.ranks) < 1:
            raise ConfigError("need >= 1 client and ranks >= 1")
        if self.max_rank is not None and self.max_rank < max(self.ranks):
            raise ConfigError(f"max_rank {self.max_rank} < largest client rank {max(self.ranks)}")
        if not 0.0 < self.availability <= 1.0:
            raise ConfigError(f"availability must be in (0, 1], got {self.availability}")
        if self.max_versions < 1 or self.local_steps < 0 or self.eval_every < 1:
            raise ConfigError("max_versions >= 1, local_steps >= 0 and eval_every >= 1 needed")

    @property
    def R(self) -> int:  # noqa: N802 - the method's notation
        return self.max_rank or max(self.ranks)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        d["method_options"] = {k: v for k, v in self.method_options}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimConfig:
        d = dict(d)
        d["ranks"] = tuple(d.get("ranks", (2, 4, 8)))
        opts = d.get("method_options") or {}
        d["method_options"] = tuple(sorted(opts.items())) if isinstance(opts, dict) else opts
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def key(self) -> str:
        """A stable hash of the whole configuration (the study's cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def pad_config(self, buffer_size: int | None = None) -> PadConfig:
        return PadConfig(
            padding=Padding(self.padding),
            weighting=Weighting(self.weighting),
            beta=self.beta,
            staleness=Staleness(self.staleness),
            staleness_a=self.staleness_a,
            max_staleness=self.max_staleness,
            buffer_size=buffer_size or self.buffer_size,
            server_lr=self.server_lr,
        )
