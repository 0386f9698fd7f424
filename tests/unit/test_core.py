"""Table tests for the HeLoRA-Pad core: weights, staleness, buffering, validation, identities."""

import math

import pytest
import torch

from helora.aggregator.core import (
    AggregatorCore,
    Applied,
    Buffered,
    CoreState,
    Duplicate,
    PadConfig,
    Rejected,
)
from helora.aggregator.strategies import Staleness, Weighting, staleness_weight, update_weight
from helora.shared.errors import ConfigError
from helora.shared.lora_ops import Padding, pad_to_rank
from helora.shared.messages import AdapterUpdate
from helora.shared.spec import AdapterSpec

A = "m.layer.0.query.lora_A.weight"
B = "m.layer.0.query.lora_B.weight"
H = "m.classifier.weight"
R = 4


def rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def global_adapter(seed=0):
    return {A: rand((R, 3), seed), B: rand((2, R), seed + 1), H: rand((2, 3), seed + 2)}


SPEC = AdapterSpec.from_tensors("test-model", global_adapter(), lora_alpha=8.0)


def delta(rank, seed):
    return {A: rand((rank, 3), seed), B: rand((2, rank), seed + 1), H: rand((2, 3), seed + 2)}


def update(uid, rank=R, n=10, base=0, seed=None, **kw):
    fields = dict(
        update_id=uid,
        client_id=f"c-{uid}",
        rank=rank,
        base_version=base,
        num_examples=n,
        fingerprint=SPEC.fingerprint,
        tensors=delta(rank, hash(uid) % 1000 if seed is None else seed),
    )
    fields.update(kw)
    return AdapterUpdate(**fields)


def core(**cfg):
    return AggregatorCore(SPEC, PadConfig(**cfg), CoreState(version=0, adapter=global_adapter()))


# ---- staleness and weights -------------------------------------------------------------------


@pytest.mark.parametrize(
    "u,kind,a,b,expected",
    [
        (0, Staleness.POLYNOMIAL, 0.5, 4, 1.0),
        (3, Staleness.POLYNOMIAL, 0.5, 4, 0.5),
        (8, Staleness.POLYNOMIAL, 1.0, 4, 1 / 9),
        (4, Staleness.HINGE, 10, 4, 1.0),
        (6, Staleness.HINGE, 10, 4, 1 / 21),
        (7, Staleness.CONSTANT, 0.5, 4, 1.0),
    ],
)
def test_staleness_weight_table(u, kind, a, b, expected):
    assert staleness_weight(u, kind, a, b) == pytest.approx(expected)


def test_staleness_weight_rejects_negative():
    with pytest.raises(ValueError):
        staleness_weight(-1)


@pytest.mark.parametrize(
    "n,r,weighting,beta,expected",
    [
        (10, 2, Weighting.DATA, 1.0, 10.0),
        (10, 2, Weighting.RANK, 1.0, 5.0),
        (10, 2, Weighting.RANK, 2.0, 2.5),
        (10, 4, Weighting.RANK, 1.0, 10.0),
        (10, 2, Weighting.RANK, 0.0, 10.0),  # beta = 0 reproduces the reference code
    ],
)
def test_update_weight_table(n, r, weighting, beta, expected):
    assert update_weight(n, r, R, weighting, beta) == pytest.approx(expected)


# ---- identities ------------------------------------------------------------------------------


@pytest.mark.parametrize("padding", list(Padding))
@pytest.mark.parametrize("weighting", list(Weighting))
def test_full_rank_equal_data_no_staleness_is_synchronous_fedavg(padding, weighting):
    c = core(buffer_size=3, server_lr=1.0, padding=padding, weighting=weighting)
    before = {n: t.clone() for n, t in c.state.adapter.items()}
    ups = [update(f"u{i}", seed=10 * i) for i in range(3)]
    decisions = [c.offer(u) for u in ups]
    assert [type(d) for d in decisions] == [Buffered, Buffered, Applied]
    for n in before:
        fedavg = before[n] + sum(u.tensors[n] for u in ups) / 3
        torch.testing.assert_close(c.state.adapter[n], fedavg)
    assert c.version == 1 and decisions[-1].update_ids == ("u0", "u1", "u2")


def test_rank_weights_and_context_padding_exact_value():
    c = core(buffer_size=2, padding=Padding.CONTEXT, weighting=Weighting.RANK, beta=1.0)
    before = {n: t.clone() for n, t in c.state.adapter.items()}
    u2, u4 = update("a", rank=2, n=30, seed=1), update("b", rank=4, n=10, seed=2)
    c.offer(u2)
    c.offer(u4)
    w2, w4 = 30 * 0.5, 10 * 1.0  # n * (r/R)
    p2 = pad_to_rank(u2.tensors, R, Padding.CONTEXT)
    for n in before:
        expect = before[n] + (w2 * p2[n] + w4 * u4.tensors[n]) / (w2 + w4)
        torch.testing.assert_close(c.state.adapter[n], expect)


def test_coverage_averages_each_component_over_covering_updates_only():
    c = core(buffer_size=2, weighting=Weighting.COVERAGE)
    before = {n: t.clone() for n, t in c.state.adapter.items()}
    u2, u4 = update("a", rank=2, n=30, seed=1), update("b", rank=4, n=10, seed=2)
    c.offer(u2)
    c.offer(u4)
    got = c.state.adapter[A] - before[A]
    low = (30 * u2.tensors[A] + 10 * u4.tensors[A][:2]) / 40
    torch.testing.assert_close(got[:2], low)
    torch.testing.assert_close(got[2:], u4.tensors[A][2:])  # only the rank-4 update covers them
    got_b = c.state.adapter[B] - before[B]
    torch.testing.assert_close(got_b[:, 2:], u4.tensors[B][:, 2:])
    torch.testing.assert_close(
        c.state.adapter[H] - before[H], (30 * u2.tensors[H] + 10 * u4.tensors[H]) / 40
    )


def test_coverage_leaves_uncovered_components_unchanged():
    c = core(buffer_size=1, weighting=Weighting.COVERAGE)
    before = c.state.adapter[A].clone()
    c.offer(update("a", rank=2))
    assert torch.equal(c.state.adapter[A][2:], before[2:])


def test_staleness_shrinks_the_step_and_is_not_normalised_away():
    c = core(buffer_size=1, server_lr=1.0)
    c.offer(update("first"))  # version 1
    c.offer(update("second", base=1))  # version 2
    before = c.state.adapter[H].clone()
    stale = update("stale", base=0, seed=5)  # u = 2
    d = c.offer(stale)
    assert isinstance(d, Applied) and d.staleness == (2,)
    torch.testing.assert_close(c.state.adapter[H] - before, stale.tensors[H] * 3**-0.5)


def test_server_lr_scales_the_step():
    c = core(buffer_size=1, server_lr=0.5)
    before = c.state.adapter[H].clone()
    u = update("x")
    c.offer(u)
    torch.testing.assert_close(c.state.adapter[H] - before, 0.5 * u.tensors[H])


# ---- buffering, ledger, flush ----------------------------------------------------------------


def test_flush_applies_partial_buffer_and_empty_flush_is_none():
    c = core(buffer_size=4)
    assert c.flush() is None
    assert isinstance(c.offer(update("a")), Buffered)
    applied = c.flush()
    assert isinstance(applied, Applied) and applied.update_ids == ("a",) and c.version == 1
    assert c.state.applied == {"a": 1}
    assert c.buffer_fill == 0


def test_duplicates_in_buffer_and_ledger_are_not_applied_twice():
    c = core(buffer_size=2)
    c.offer(update("a"))
    assert isinstance(c.offer(update("a")), Duplicate)
    c.offer(update("b"))
    snapshot = {n: t.clone() for n, t in c.state.adapter.items()}
    assert isinstance(c.offer(update("a")), Duplicate)
    assert all(torch.equal(snapshot[n], c.state.adapter[n]) for n in snapshot)
    assert c.state.counters["duplicate"] == 2 and c.state.counters["applied"] == 2


# ---- rejections ------------------------------------------------------------------------------


def _bad(kind):
    if kind == "fingerprint":
        return update("x", fingerprint="sha256:other"), "fingerprint_mismatch"
    if kind == "rank_high":
        return update("x", rank=R + 1), "bad_rank"
    if kind == "rank_zero":
        return update("x", rank=0, tensors=delta(1, 0)), "bad_rank"
    if kind == "examples":
        return update("x", n=0), "bad_example_count"
    if kind == "future":
        return update("x", base=5), "future_base_version"
    if kind == "names":
        t = delta(R, 0)
        t["m.extra.weight"] = torch.zeros(1)
        return update("x", tensors=t), "bad_tensor_names"
    if kind == "shape":
        return update("x", rank=2, tensors=delta(3, 0)), "bad_tensor_shape"
    if kind == "nan":
        t = delta(R, 0)
        t[A][0, 0] = float("nan")
        return update("x", tensors=t), "non_finite"
    if kind == "inf":
        t = delta(R, 0)
        t[H][0, 0] = math.inf
        return update("x", tensors=t), "non_finite"
    if kind == "dtype":
        t = delta(R, 0)
        t[H] = torch.zeros(2, 3, dtype=torch.int32)
        return update("x", tensors=t), "bad_dtype"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "fingerprint",
        "rank_high",
        "rank_zero",
        "examples",
        "future",
        "names",
        "shape",
        "nan",
        "inf",
        "dtype",
    ],
)
def test_rejections_table_leave_state_unchanged(kind):
    c = core(buffer_size=1)
    before = {n: t.clone() for n, t in c.state.adapter.items()}
    bad, reason = _bad(kind)
    d = c.offer(bad)
    assert isinstance(d, Rejected) and d.reason == reason, d
    assert c.version == 0 and c.buffer_fill == 0
    assert all(torch.equal(before[n], c.state.adapter[n]) for n in before)
    assert c.state.counters[f"rejected:{reason}"] == 1


def test_too_stale_rejected_and_boundary_accepted():
    c = core(buffer_size=1, max_staleness=2)
    for v in range(3):
        c.offer(update(f"v{v}", base=v))
    assert c.version == 3
    assert isinstance(c.offer(update("ok", base=1)), Applied)  # u = 2 <= u_max
    d = c.offer(update("old", base=1))  # u = 3 > 2
    assert isinstance(d, Rejected) and d.reason == "too_stale"


def test_allowed_ranks():
    c = core(allowed_ranks=frozenset({2, 4}))
    assert isinstance(c.offer(update("a", rank=2)), Buffered)
    d = c.offer(update("b", rank=3))
    assert isinstance(d, Rejected) and d.reason == "bad_rank"


@pytest.mark.parametrize("cfg", [dict(buffer_size=0), dict(max_staleness=-1), dict(server_lr=0)])
def test_bad_config_raises(cfg):
    with pytest.raises(ConfigError):
        PadConfig(**cfg)
