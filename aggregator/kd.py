"""HeLoRA-KD as a pure state machine (HELORA_METHOD.md section 0 item 8, section (g) 6).

Rules:
- One slot adapter per configured rank level (e.g. 2, 4, 8; the largest level must be R). Slot r
  holds tensors at rank r; the slot at R is ``CoreState.adapter`` itself (the same dict). A fresh
  state starts every slot as the version-0 global cut to its rank.
- An update of rank r goes to slot r only; a rank that is not a level is rejected (``bad_rank``).
  Validation, staleness cut-off, K-update buffers and the ledger are the core's (core.py); one
  buffer may mix slots.
- Applying a buffer: each slot r with updates in it takes
      slot_r += eta * sum_{k -> r} s_k n_k D_k / sum_{k -> r} n_k
  (data weights normalised over that slot's updates, staleness not normalised away). Slots with
  no update in the buffer are unchanged by this step.
- Teacher record: ``CoreState.slot_updates[r]`` = ((n_k, tau_k), ...) of the updates in the most
  recent applied buffer that addressed slot r. After the version moves from t to t + 1,
      w_r = (r / R)^beta * sum_{(n, tau) in record_r} n * s(t - tau),     normalised to sum 1,
  so a slot refreshed by this buffer weighs with the same s(u) its delta got, a slot whose last
  update is older keeps decaying as versions pass, and a never-updated slot does not teach (0).
- Then the injected ``distiller(slots, teacher_weights) -> slots`` (distill.py in production,
  fakes in tests; None = no distillation) runs once per new version on every slot (mutual
  distillation); its result replaces the slots (same names and shapes, checked). A slot whose
  distilled tensors are not finite keeps its pre-distillation tensors (counted ``kd_nonfinite``).

The pure KD loss pieces (``teacher_logits``, ``kd_loss``) live here too; the model-bound
distillation loop is distill.py (the only aggregator module that imports transformers/peft).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from helora.aggregator.core import AggregatorCore, CoreState, PadConfig
from helora.aggregator.strategies import PadAccumulator, Staleness, Weighting, staleness_weight
from helora.shared.errors import ConfigError
from helora.shared.lora_ops import Padding, cut_to_rank
from helora.shared.messages import AdapterUpdate, GlobalAdapter, Tensors
from helora.shared.spec import AdapterSpec

Distiller = Callable[[dict[int, Tensors], dict[int, float]], dict[int, Tensors]]


# ---- pure KD pieces --------------------------------------------------------------------------


def teacher_logits(
    logits_by_slot: Mapping[int, torch.Tensor], weights: Mapping[int, float]
) -> torch.Tensor:
    """sum_r w_r z_r / sum_r w_r over the slots of ``logits_by_slot`` (missing weight = 0)."""
    if not logits_by_slot:
        raise ValueError("no slot logits")
    ws = {r: float(weights.get(r, 0.0)) for r in logits_by_slot}
    if any(not w >= 0 for w in ws.values()):  # also catches NaN
        raise ValueError(f"teacher weights must be >= 0, got {ws}")
    total = sum(ws.values())
    if not total > 0:
        raise ValueError("teacher weights sum to 0")
    out = torch.zeros_like(next(iter(logits_by_slot.values())))
    for r, z in logits_by_slot.items():
        if ws[r] > 0:
            out = out + (ws[r] / total) * z
    return out


def kd_loss(
    student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_student = F.log_softmax(student_logits / t, dim=-1)
    log_teacher = F.log_softmax(teacher.detach() / t, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * (t * t)


def teacher_weights(
    records: Mapping[int, Sequence[tuple[int, int]]],
    levels: Iterable[int],
    version: int,
    *,
    max_rank: int,
    beta: float = 1.0,
    staleness: Staleness | str = Staleness.POLYNOMIAL,
    staleness_a: float = 0.5,
    hinge_b: int = 4,
) -> dict[int, float]:
    """Normalised w_r = (r/R)^beta * sum n * s(version - tau) over slot r's record (module doc).

    All zeros when no slot has a record.
    """
    raw: dict[int, float] = {}
    for r in levels:
        mass = sum(
            n * staleness_weight(max(version - tau, 0), staleness, staleness_a, hinge_b)
            for n, tau in records.get(r, ())
        )
        raw[r] = (r / max_rank) ** beta * mass
    total = sum(raw.values())
    if total <= 0:
        return {r: 0.0 for r in raw}
    return {r: w / total for r, w in raw.items()}


# ---- the core --------------------------------------------------------------------------------


class SlotAccumulators:
    """One data-weighted PadAccumulator per slot touched by the open buffer."""

    def __init__(self) -> None:
        self.by_slot: dict[int, PadAccumulator] = {}
        self.records: dict[int, list[tuple[int, int]]] = {}
        self.count = 0

    def add(
        self, delta: Tensors, rank: int, num_examples: int, staleness_factor: float, base: int
    ) -> None:
        acc = self.by_slot.get(rank)
        if acc is None:
            acc = self.by_slot[rank] = PadAccumulator(rank, Padding.ZERO, Weighting.DATA)
        acc.add(delta, rank, num_examples, staleness_factor)
        self.records.setdefault(rank, []).append((num_examples, base))
        self.count += 1


class KDCore(AggregatorCore):
    """HeLoRA-KD: slot r <- updates of rank r, then mutual distillation (module doc)."""

    method = "kd"

    def __init__(
        self,
        spec: AdapterSpec,
        config: PadConfig,
        state: CoreState,
        *,
        rank_levels: Iterable[int] | None = None,
        distiller: Distiller | None = None,
        method: str | None = None,
    ) -> None:
        self.levels = _levels(spec, config, rank_levels)
        self.distiller = distiller
        self.last_teacher_weights: dict[int, float] = {}
        config = replace(config, allowed_ranks=frozenset(self.levels))
        super().__init__(spec, config, state, method=method)
        self._init_slots()

    @property
    def slots(self) -> dict[int, Tensors]:
        assert self.state.slots is not None
        return self.state.slots

    def global_adapter(
        self, update_ids: tuple[str, ...] = (), parent: int | None = None, created_at: float = 0.0
    ) -> GlobalAdapter:
        g = super().global_adapter(update_ids, parent, created_at)
        return replace(g, slots={r: self.slots[r] for r in self.levels})

    # ---- hooks ----

    def _new_accumulator(self) -> SlotAccumulators:  # type: ignore[override]
        return SlotAccumulators()

    def _accumulate(self, update: AdapterUpdate, delta: Tensors, staleness_factor: float) -> None:
        acc: SlotAccumulators = self._acc  # type: ignore[assignment]
        acc.add(delta, update.rank, update.num_examples, staleness_factor, update.base_version)

    def _apply_buffer(self) -> None:
        acc: SlotAccumulators = self._acc  # type: ignore[assignment]
        eta = self.config.server_lr
        for rank, slot_acc in acc.by_slot.items():
            slot = self.slots[rank]
            for name, t in slot_acc.apply(slot, eta).items():
                slot[name] = t
            self.state.slot_updates[rank] = tuple(acc.records[rank])

    def _after_version(self, parent: int) -> None:
        c = self.config
        weights = teacher_weights(
            self.state.slot_updates,
            self.levels,
            parent,
            max_rank=self.spec.max_rank,
            beta=c.beta,
            staleness=c.staleness,
            staleness_a=c.staleness_a,
            hinge_b=c.hinge_b,
        )
        self.last_teacher_weights = weights
        if self.distiller is None or not any(w > 0 for w in weights.values()):
            return
        result = self.distiller({r: dict(self.slots[r]) for r in self.levels}, dict(weights))
        self._check_distilled(result)
        for rank in self.levels:
            new = result[rank]
            if not all(bool(torch.isfinite(t).all()) for t in new.values()):
                self.state.counters["kd_nonfinite"] += 1
                continue
            slot = self.slots[rank]
            for name, t in new.items():
                slot[name] = t.detach().to("cpu", torch.float32)
        self.state.counters["kd_distillations"] += 1

    # ---- internals ----

    def _init_slots(self) -> None:
        top = self.spec.max_rank
        if self.state.slots is None:
            self.state.slots = {r: cut_to_rank(self.state.adapter, r) for r in self.levels[:-1]}
        slots = self.state.slots
        if set(slots) - set(self.levels):
            raise ConfigError(f"state has slots {sorted(slots)} but levels are {self.levels}")
        given_top = slots.get(top)
        if given_top is not None and given_top is not self.state.adapter:
            same = given_top.keys() == self.state.adapter.keys() and all(
                torch.equal(given_top[n], self.state.adapter[n]) for n in given_top
            )
            if not same:
                raise ConfigError(f"state.slots[{top}] differs from state.adapter")
        slots[top] = self.state.adapter  # one dict: the slot at R is the global adapter
        for r in self.levels:
            if r not in slots:
                slots[r] = cut_to_rank(self.state.adapter, r)
            self._check_slot(r, slots[r])
        if set(self.state.slot_updates) - set(self.levels):
            raise ConfigError(f"slot_updates for unknown levels {sorted(self.state.slot_updates)}")

    def _check_slot(self, rank: int, tensors: Tensors) -> None:
        if set(tensors) != set(self.spec.shapes):
            raise ConfigError(f"slot {rank} tensors do not match the adapter spec")
        for name, t in tensors.items():
            if tuple(t.shape) != self.spec.shape_at_rank(name, rank):
                raise ConfigError(f"slot {rank} tensor {name} has shape {tuple(t.shape)}")

    def _check_distilled(self, result: Mapping[int, Tensors]) -> None:
        """The distiller is our own code: a changed key set or shape is a bug, not bad input."""
        if set(result) != set(self.levels):
            raise RuntimeError(f"distiller returned slots {sorted(result)}, want {self.levels}")
        for rank, tensors in result.items():
            old = self.slots[rank]
            if tensors.keys() != old.keys() or any(
                tuple(tensors[n].shape) != tuple(old[n].shape) for n in old
            ):
                raise RuntimeError(f"distiller changed the names or shapes of slot {rank}")


def _levels(
    spec: AdapterSpec, config: PadConfig, rank_levels: Iterable[int] | None
) -> tuple[int, ...]:
    """The sorted rank levels: ``rank_levels``, else the config's allowed ranks."""
    if rank_levels is None:
        if config.allowed_ranks is None:
            raise ConfigError("kd needs rank levels (rank_levels= or allowed_ranks)")
        levels = tuple(sorted(config.allowed_ranks))
    else:
        levels = tuple(sorted(set(int(r) for r in rank_levels)))
        if config.allowed_ranks is not None and set(levels) != set(config.allowed_ranks):
            raise ConfigError(
                f"rank levels {levels} differ from allowed ranks {sorted(config.allowed_ranks)}"
            )
    if not levels or levels[0] < 1:
        raise ConfigError(f"kd rank levels must be >= 1, got {levels}")
    if levels[-1] != spec.max_rank:
        raise ConfigError(f"the largest kd rank level must be R={spec.max_rank}, got {levels}")
    return levels
