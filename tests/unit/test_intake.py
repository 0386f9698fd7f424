"""Admission before the core: routing key, broker-validated identity, norm guard, bookkeeping."""

import torch

from helora.aggregator.core import AggregatorCore, Buffered, CoreState, Duplicate, PadConfig
from helora.aggregator.guards import NormGuard
from helora.aggregator.intake import Intake
from helora.shared.messages import AdapterUpdate
from helora.shared.spec import AdapterSpec

A = "m.l.query.lora_A.weight"
B = "m.l.query.lora_B.weight"
INITIAL = {A: torch.zeros(4, 3), B: torch.zeros(2, 4)}
SPEC = AdapterSpec.from_tensors("t", INITIAL, 8.0)


def core():
    return AggregatorCore(SPEC, PadConfig(buffer_size=8), CoreState(0, dict(INITIAL)))


def update(uid="u", client="c1", scale=0.1):
    return AdapterUpdate(
        uid,
        client,
        4,
        0,
        10,
        SPEC.fingerprint,
        {A: torch.full((4, 3), scale), B: torch.full((2, 4), scale)},
    )


def test_routing_key_must_match_the_payload():
    c, intake = core(), Intake(NormGuard())
    d, _ = intake.admit(c, update(client="c1"), routing_key="c2", user_id=None)
    assert d.reason == "client_id_mismatch" and c.state.counters["rejected:client_id_mismatch"]


def test_broker_validated_user_id_is_trusted_over_the_payload():
    c, intake = core(), Intake(NormGuard())
    d, _ = intake.admit(c, update(client="c1"), routing_key="c1", user_id="mallory")
    assert d.reason == "identity_mismatch"
    d, _ = intake.admit(c, update(client="c1"), routing_key="c1", user_id="c1")
    assert isinstance(d, Buffered)


def test_require_user_id_rejects_anonymous_updates():
    c, intake = core(), Intake(NormGuard(), require_user_id=True)
    d, _ = intake.admit(c, update(), routing_key="c1", user_id=None)
    assert d.reason == "identity_mismatch"


def test_norm_guard_rejects_and_learns_only_committed_norms():
    c, intake = core(), Intake(NormGuard(max_norm=100.0))
    d, norm = intake.admit(c, update(uid="big", scale=50.0), "c1", None)
    assert d.reason == "norm_too_large" and norm > 100 and c.buffer_fill == 0
    d, _ = intake.admit(c, update(uid="ok"), "c1", None)
    assert isinstance(d, Buffered)
    assert len(intake.guard._recent) == 0  # not before the version is durable
    intake.committed()
    assert len(intake.guard._recent) == 1
    d, _ = intake.admit(c, update(uid="ok"), "c1", None)  # duplicate in the buffer
    assert isinstance(d, Duplicate)
    intake.dropped()
    intake.committed()
    assert len(intake.guard._recent) == 1  # a duplicate's norm is never recorded
