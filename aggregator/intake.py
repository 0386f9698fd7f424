"""Admission of one decoded update, before and around the core (pure: no broker, no files).

Checks, in order: the payload's client id equals the routing key; the broker-validated user id
(when present, or when required) equals the client id; the update's norm is within the guard's
bounds (skipped for ids already applied: those are duplicates, not attacks); then the core
(validation, staleness, buffering, apply). Norms of buffered updates join the guard's window
only once their version is committed.
"""

from __future__ import annotations

from helora.aggregator.core import AggregatorCore, Applied, Buffered, Decision, Rejected
from helora.aggregator.guards import NormGuard, adapter_norm
from helora.shared.messages import AdapterUpdate


class Intake:
    def __init__(self, guard: NormGuard, *, require_user_id: bool = False) -> None:
        self.guard = guard
        self.require_user_id = require_user_id
        self._pending_norms: list[float] = []

    def admit(
        self, core: AggregatorCore, update: AdapterUpdate, routing_key: str, user_id: str | None
    ) -> tuple[Decision, float]:
        """(decision, norm) for one update; the norm is 0.0 when it was not computed.

        Every rejection is counted in the core's counters, like the core's own."""
        u = update
        if u.client_id != routing_key:
            detail = f"payload {u.client_id!r} vs routing key {routing_key!r}"
            return self._reject(core, u, "client_id_mismatch", detail), 0.0
        if (user_id is not None or self.require_user_id) and user_id != u.client_id:
            detail = f"broker-validated user {user_id!r} sent as {u.client_id!r}"
            return self._reject(core, u, "identity_mismatch", detail), 0.0
        norm = adapter_norm(u.tensors)
        if u.update_id not in core.state.applied:
            too_large = self.guard.check(norm)
            if too_large:
                return self._reject(core, u, "norm_too_large", too_large), norm
        decision = core.offer(u)
        if isinstance(decision, Buffered | Applied):
            self._pending_norms.append(norm)
        return decision, norm

    @staticmethod
    def _reject(core: AggregatorCore, u: AdapterUpdate, reason: str, detail: str) -> Rejected:
        core.state.counters[f"rejected:{reason}"] += 1
        return Rejected(u.update_id, u.client_id, reason, detail)

    def committed(self) -> None:
        """The buffer's version is durable: its norms now count as 'recent accepted updates'."""
        for norm in self._pending_norms:
            self.guard.accepted(norm)
        self._pending_norms.clear()

    def dropped(self) -> None:
        """The buffer was dropped (connection lost): its updates will be redelivered."""
        self._pending_norms.clear()
