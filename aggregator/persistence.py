"""The aggregator's durable state: checkpoints <-> core state, and the status file.

Kept apart from the service's broker loop: resuming (or creating version 0), noticing that
another aggregator has checkpointed newer versions (a standby taking over), saving a version,
and writing status.json.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import structlog

from helora.aggregator.checkpoint import Checkpoint, CheckpointStore, write_json_atomic
from helora.aggregator.core import CoreState
from helora.shared.errors import ConfigError
from helora.shared.messages import Tensors
from helora.shared.spec import AdapterSpec

log = structlog.get_logger(__name__)


def state_of(ckpt: Checkpoint) -> CoreState:
    slots = None
    if ckpt.slots:  # KD: slot R is the adapter itself (the same dict)
        slots = {**ckpt.slots, ckpt.max_rank: ckpt.adapter}
    return CoreState(
        ckpt.version,
        ckpt.adapter,
        dict(ckpt.ledger),
        ckpt.counters,
        ckpt.staleness_hist,
        slots=slots,
        slot_updates=dict(ckpt.slot_updates),
        history=dict(ckpt.history),
    )


class Persistence:
    def __init__(self, store: CheckpointStore, spec: AdapterSpec, method: str) -> None:
        self.store = store
        self.spec = spec
        self.method = method
        self.update_ids: tuple[str, ...] = ()  # of the current version: a republish repeats them

    def resume(self, initial_adapter: Callable[[], Tensors]) -> CoreState:
        """The last checkpoint's state, or version 0 (checkpointed at once) if there is none."""
        ckpt = self.store.load_latest()
        if ckpt is None:
            state = CoreState(version=0, adapter=initial_adapter())
            self.save(state, parent=-1, update_ids=())
            log.info("initialised_global", version=0, checkpoint=str(self.store.latest_path()))
            return state
        if ckpt.fingerprint != self.spec.fingerprint or ckpt.method != self.method:
            raise ConfigError(
                f"checkpoint {ckpt.path} is for another model or method ({ckpt.method}, "
                f"{ckpt.fingerprint}; this service: {self.method}, {self.spec.fingerprint}); "
                "use another --checkpoint-dir"
            )
        self.update_ids = ckpt.update_ids
        log.info(
            "resumed", version=ckpt.version, checkpoint=str(ckpt.path), applied=len(ckpt.ledger)
        )
        return state_of(ckpt)

    def newer_than(self, version: int) -> CoreState | None:
        """The newest checkpointed state if it is newer than ``version`` (else None)."""
        latest = self.store.latest_version()
        if latest is None or latest <= version:
            return None
        ckpt = self.store.load_latest()
        assert ckpt is not None
        self.update_ids = ckpt.update_ids
        log.info("took_over", version=ckpt.version, checkpoint=str(ckpt.path))
        return state_of(ckpt)

    def save(self, state: CoreState, parent: int, update_ids: tuple[str, ...]) -> None:
        self.update_ids = update_ids
        self.store.save(
            Checkpoint(
                version=state.version,
                parent_version=parent,
                method=self.method,
                max_rank=self.spec.max_rank,
                fingerprint=self.spec.fingerprint,
                adapter=state.adapter,
                update_ids=update_ids,
                ledger=state.applied,
                counters=state.counters,
                staleness_hist=state.staleness_hist,
                created_at=time.time(),
                slots={r: t for r, t in (state.slots or {}).items() if r != self.spec.max_rank},
                slot_updates=state.slot_updates,
                history=state.history,
            )
        )

    def write_status(self, state: CoreState, session: Counter[str], buffered: int) -> None:
        """status.json beside the checkpoints: cumulative counters, including rejections after
        the last checkpoint (read by `helora demo`, `helora status` and operators)."""
        write_json_atomic(
            self.store.root / "status.json",
            {
                "version": state.version,
                "checkpoint": str(self.store.latest_path()),
                "counters": dict(state.counters),
                "staleness_hist": {str(k): v for k, v in sorted(state.staleness_hist.items())},
                "session": dict(session),
                "buffered_not_applied": buffered,
            },
        )
