"""The aggregator's pure state machine: (state, decoded update) -> decision. No I/O.

Rules (HELORA_METHOD.md section 0 items 5-7):
- Validation is cheap-first: duplicate id, fingerprint, rank, counts, base version and staleness,
  tensor names, shapes, finiteness. A rejected update leaves the state unchanged.
- Staleness u = version - base_version is fixed at arrival: the version only moves when a buffer
  is applied, and every update in a buffer arrived at the same version.
- After K accepted updates (or ``flush()`` when the service's timer fires with at least one), the
  global becomes global + eta * aggregated delta and the version increases by one.
- The ledger of applied update ids is part of the state: a redelivered update is a ``Duplicate``,
  never applied twice. Updates still in the buffer count as seen too.
- Other aggregation rules (methods.py: zero-pad, HetLoRA, FlexLoRA, HeLoRA-KD) reuse these rules
  by overriding the hooks ``_new_accumulator``, ``_accumulate``, ``_apply_buffer``,
  ``_after_version`` and ``_validate``; versioning, ledger and counters live only here.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from helora.aggregator.strategies import (
    Accumulator,
    PadAccumulator,
    Staleness,
    Weighting,
    staleness_weight,
)
from helora.shared.errors import ConfigError
from helora.shared.lora_ops import Padding
from helora.shared.messages import AdapterUpdate, GlobalAdapter, Tensors
from helora.shared.spec import AdapterSpec


@dataclass(frozen=True)
class PadConfig:
    """HeLoRA-Pad settings: HELORA_METHOD.md section 0's defaults, except zero padding (the study
    measured context padding worse at rank R; README "Accuracy study")."""

    padding: Padding = Padding.ZERO
    weighting: Weighting = Weighting.RANK
    beta: float = 1.0
    staleness: Staleness = Staleness.POLYNOMIAL
    staleness_a: float = 0.5
    hinge_b: int = 4
    max_staleness: int = 8  # u_max: older updates are rejected as too_stale
    buffer_size: int = 4  # K
    server_lr: float = 1.0  # eta
    allowed_ranks: frozenset[int] | None = None  # None: any rank 1..R

    def __post_init__(self) -> None:
        if self.buffer_size < 1:
            raise ConfigError(f"buffer_size must be >= 1, got {self.buffer_size}")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if not self.server_lr > 0:
            raise ConfigError(f"server_lr must be > 0, got {self.server_lr}")


# ---- decisions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Buffered:
    update_id: str
    client_id: str
    staleness: int
    fill: int  # updates in the buffer now


@dataclass(frozen=True)
class Applied:
    version: int
    parent_version: int
    update_ids: tuple[str, ...]
    staleness: tuple[int, ...]  # per applied update, same order


@dataclass(frozen=True)
class Rejected:
    update_id: str
    client_id: str
    reason: str  # stable snake_case code, used as the dead-letter reason
    detail: str = ""


@dataclass(frozen=True)
class Duplicate:
    update_id: str
    client_id: str


Decision = Buffered | Applied | Rejected | Duplicate


@dataclass
class CoreState:
    version: int
    adapter: Tensors  # the global at rank R, float32
    applied: dict[str, int] = field(default_factory=dict)  # ledger: update id -> version
    counters: Counter[str] = field(default_factory=Counter)
    staleness_hist: Counter[int] = field(default_factory=Counter)
    # HeLoRA-KD only (kd.py): the slot adapters by rank level, each at its own rank. The slot at R
    # is ``adapter`` itself (the same dict), so only the levels below R need persisting.
    slots: dict[int, Tensors] | None = None
    # HeLoRA-KD only: per slot, (num_examples, base_version) of the updates in the most recent
    # applied buffer that addressed that slot (the teacher-weight record).
    slot_updates: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    # FlexLoRA only (baselines.py): the LoRA factors of the previous versions (version -> tensors),
    # the last ``max_staleness`` of them, to rebuild a stale client's product exactly.
    history: dict[int, Tensors] = field(default_factory=dict)


class AggregatorCore:
    """HeLoRA-Pad as a state machine: ``offer`` decoded updates; ``flush`` on a timer."""

    method = "pad"

    def __init__(
        self, spec: AdapterSpec, config: PadConfig, state: CoreState, *, method: str | None = None
    ) -> None:
        if method is not None:
            self.method = method
        self.spec = spec
        self.config = config
        self.state = state
        self._check_adapter(state.adapter)
        self._buffer_ids: list[str] = []
        self._buffer_staleness: list[int] = []
        self._acc = self._new_accumulator()

    # ---- public API ----

    @property
    def version(self) -> int:
        return self.state.version

    @property
    def buffer_fill(self) -> int:
        return len(self._buffer_ids)

    def global_adapter(
        self, update_ids: tuple[str, ...] = (), parent: int | None = None, created_at: float = 0.0
    ) -> GlobalAdapter:
        return GlobalAdapter(
            version=self.state.version,
            parent_version=self.state.version - 1 if parent is None else parent,
            method=self.method,
            max_rank=self.spec.max_rank,
            fingerprint=self.spec.fingerprint,
            slots={self.spec.max_rank: self.state.adapter},
            update_ids=update_ids,
            created_at=created_at,
        )

    def offer(self, update: AdapterUpdate) -> Decision:
        """Validate and buffer one update; apply the buffer when it holds K updates."""
        if update.update_id in self.state.applied or update.update_id in self._buffer_ids:
            self.state.counters["duplicate"] += 1
            return Duplicate(update.update_id, update.client_id)
        problem = self._validate(update)
        if problem is not None:
            reason, detail = problem
            self.state.counters[f"rejected:{reason}"] += 1
            return Rejected(update.update_id, update.client_id, reason, detail)
        u = self.state.version - update.base_version
        s = staleness_weight(u, self.config.staleness, self.config.staleness_a, self.config.hinge_b)
        delta = {n: t.to(torch.float32) for n, t in update.tensors.items()}
        self._accumulate(update, delta, s)
        self._buffer_ids.append(update.update_id)
        self._buffer_staleness.append(u)
        if len(self._buffer_ids) >= self.config.buffer_size:
            return self.flush()
        return Buffered(update.update_id, update.client_id, u, len(self._buffer_ids))

    def flush(self) -> Applied | None:
        """Apply the buffer (if it holds anything) and start a new version."""
        if not self._buffer_ids:
            return None
        parent = self.state.version
        self._apply_buffer()
        self.state.version += 1
        ids, stale = tuple(self._buffer_ids), tuple(self._buffer_staleness)
        for uid in ids:
            self.state.applied[uid] = self.state.version
        self.state.counters["applied"] += len(ids)
        self.state.staleness_hist.update(stale)
        self._buffer_ids, self._buffer_staleness = [], []
        self._after_version(parent)
        self._acc = self._new_accumulator()
        return Applied(self.state.version, parent, ids, stale)

    def pending_ids(self) -> tuple[str, ...]:
        return tuple(self._buffer_ids)

    # ---- internals ----

    def _new_accumulator(self) -> Accumulator:
        c = self.config
        return PadAccumulator(self.spec.max_rank, c.padding, c.weighting, c.beta)

    def _accumulate(self, update: AdapterUpdate, delta: Tensors, staleness_factor: float) -> None:
        """Add one validated update (float32 ``delta``) to the open buffer."""
        self._acc.add(delta, update.rank, update.num_examples, staleness_factor)

    def _apply_buffer(self) -> None:
        """Replace the global's tensors by the buffer's result (still at the parent version)."""
        new = self._acc.apply(self.state.adapter, self.config.server_lr)
        for name, t in new.items():
            self.state.adapter[name] = t

    def _after_version(self, parent: int) -> None:
        """Called once the version moved from ``parent`` to ``state.version`` (ledger written)."""

    def _check_adapter(self, adapter: Tensors) -> None:
        if set(adapter) != set(self.spec.shapes):
            raise ConfigError("global adapter tensors do not match the adapter spec")
        for name, t in adapter.items():
            if tuple(t.shape) != self.spec.shapes[name]:
                raise ConfigError(f"global tensor {name} has shape {tuple(t.shape)}")

    def _validate(self, u: AdapterUpdate) -> tuple[str, str] | None:
        """The first problem with an update as (reason, detail), or None if it is acceptable."""
        spec, cfg = self.spec, self.config
        if u.fingerprint != spec.fingerprint:
            return "fingerprint_mismatch", f"got {u.fingerprint}, want {spec.fingerprint}"
        allowed = cfg.allowed_ranks
        if not 1 <= u.rank <= spec.max_rank or (allowed is not None and u.rank not in allowed):
            return "bad_rank", f"rank {u.rank} not allowed (R={spec.max_rank})"
        if u.num_examples <= 0:
            return "bad_example_count", f"num_examples={u.num_examples}"
        if u.base_version > self.state.version:
            return "future_base_version", f"base {u.base_version} > version {self.state.version}"
        if self.state.version - u.base_version > cfg.max_staleness:
            return "too_stale", (
                f"staleness {self.state.version - u.base_version} > {cfg.max_staleness}"
            )
        if set(u.tensors) != set(spec.shapes):
            missing = sorted(set(spec.shapes) - set(u.tensors))[:3]
            extra = sorted(set(u.tensors) - set(spec.shapes))[:3]
            return "bad_tensor_names", f"missing={missing} unexpected={extra}"
        for name, t in u.tensors.items():
            want = spec.shape_at_rank(name, u.rank)
            if tuple(t.shape) != want:
                return "bad_tensor_shape", f"{name}: {tuple(t.shape)} != {want}"
            if not t.is_floating_point():
                return "bad_dtype", f"{name}: {t.dtype}"
            if not all_finite(t):
                return "non_finite", name
        return None


def all_finite(t: torch.Tensor) -> bool:
    """Exactly ``isfinite(t).all()``: a finite sum proves it (inf/nan make the sum non-finite),
    and costs ~10x less on a 7B-class update; only a non-finite sum needs the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def norm(tensors: Tensors) -> float:
    """Frobenius norm over a whole adapter (for logging and norm bounds)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
