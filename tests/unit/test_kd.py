"""HeLoRA-KD: the pure KD pieces, the slot core with fake distillers, and one small real
distillation with the packaged MiniLM (slow)."""

import math

import pytest
import torch

from helora.aggregator.core import Applied, Buffered, CoreState, Duplicate, PadConfig, Rejected
from helora.aggregator.kd import KDCore, kd_loss, teacher_logits, teacher_weights
from helora.aggregator.methods import make_core
from helora.aggregator.strategies import Staleness
from helora.shared.errors import ConfigError
from helora.shared.lora_ops import cut_to_rank
from helora.shared.messages import AdapterUpdate
from helora.shared.spec import AdapterSpec

A = "m.layer.0.query.lora_A.weight"
B = "m.layer.0.query.lora_B.weight"
H = "m.classifier.weight"
R = 8
LEVELS = (2, 4, 8)


def rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def global_adapter(seed=0):
    return {A: rand((R, 3), seed), B: rand((2, R), seed + 1), H: rand((2, 3), seed + 2)}


SPEC = AdapterSpec.from_tensors("kd-test", global_adapter(), lora_alpha=16.0)


def delta(rank, seed):
    return {A: rand((rank, 3), seed), B: rand((2, rank), seed + 1), H: rand((2, 3), seed + 2)}


def update(uid, rank, n=10, base=0, seed=1):
    return AdapterUpdate(
        update_id=uid,
        client_id=f"c-{uid}",
        rank=rank,
        base_version=base,
        num_examples=n,
        fingerprint=SPEC.fingerprint,
        tensors=delta(rank, seed),
    )


class FakeDistiller:
    """Records its calls; returns every slot shifted by +1 (or a custom function's result)."""

    def __init__(self, fn=None):
        self.calls = []
        self.fn = fn or (
            lambda slots: {r: {n: t + 1.0 for n, t in s.items()} for r, s in slots.items()}
        )

    def __call__(self, slots, weights):
        self.calls.append(
            ({r: {n: t.clone() for n, t in s.items()} for r, s in slots.items()}, weights)
        )
        return self.fn(slots)


def kd_core(distiller=None, state=None, **cfg):
    cfg.setdefault("buffer_size", 1)
    state = state or CoreState(version=0, adapter=global_adapter())
    core = make_core("kd", SPEC, PadConfig(**cfg), state, rank_levels=LEVELS, distiller=distiller)
    assert isinstance(core, KDCore)
    return core


def snapshot(core):
    return {r: {n: t.clone() for n, t in s.items()} for r, s in core.slots.items()}


# ---- pure pieces -----------------------------------------------------------------------------


def test_teacher_logits_is_the_normalised_weighted_mean():
    z = {
        2: torch.tensor([[1.0, 0.0]]),
        4: torch.tensor([[3.0, 2.0]]),
        8: torch.tensor([[9.0, 9.0]]),
    }
    got = teacher_logits(z, {2: 1.0, 4: 3.0, 8: 0.0})
    torch.testing.assert_close(got, torch.tensor([[2.5, 1.5]]))
    torch.testing.assert_close(teacher_logits(z, {4: 2.0}), z[4])  # missing weights are 0
    for bad in ({2: -1.0, 4: 2.0}, {2: 0.0}, {2: math.nan, 4: 1.0}):
        with pytest.raises(ValueError):
            teacher_logits(z, bad)


def test_kd_loss_zero_when_equal_positive_otherwise_and_t_squared_scaling():
    z = rand((5, 3), 0)
    assert float(kd_loss(z, z.clone())) == pytest.approx(0.0, abs=1e-7)
    other = rand((5, 3), 1)
    loss = kd_loss(z, other)
    assert float(loss) > 0
    # explicit KL(p_teacher || p_student), batch mean
    p = torch.softmax(other, -1)
    manual = (p * (torch.log_softmax(other, -1) - torch.log_softmax(z, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, manual)
    # temperature T: T^2 * KL of the softened distributions
    t = 2.0
    soft = kd_loss(z / t, other / t, 1.0)
    torch.testing.assert_close(kd_loss(z, other, t), t * t * soft)
    with pytest.raises(ValueError):
        kd_loss(z, other, 0.0)


def test_kd_loss_gradient_flows_to_the_student_only():
    student = rand((4, 2), 2).requires_grad_()
    teacher = rand((4, 2), 3).requires_grad_()
    kd_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


@pytest.mark.parametrize(
    "records,version,staleness,expected",
    [
        ({8: ((10, 0),)}, 0, Staleness.POLYNOMIAL, {2: 0.0, 4: 0.0, 8: 1.0}),
        # n * (r/R): 2: 40 * 0.25 = 10, 4: 20 * 0.5 = 10, 8: 10 * 1 = 10
        ({2: ((40, 0),), 4: ((20, 0),), 8: ((10, 0),)}, 0, Staleness.POLYNOMIAL, "equal"),
        # ages: slot 2 last updated from base 0 seen at version 3: s(3) = 1/2
        ({2: ((40, 0),), 8: ((10, 3),)}, 3, Staleness.POLYNOMIAL, {2: 5 / 15, 4: 0.0, 8: 10 / 15}),
        ({2: ((40, 0),), 8: ((10, 3),)}, 3, Staleness.CONSTANT, {2: 0.5, 4: 0.0, 8: 0.5}),
        # several updates of one slot in one buffer add up
        ({4: ((10, 0), (30, 0)), 8: ((20, 0),)}, 0, Staleness.POLYNOMIAL, {2: 0, 4: 0.5, 8: 0.5}),
        ({}, 5, Staleness.POLYNOMIAL, {2: 0.0, 4: 0.0, 8: 0.0}),
    ],
)
def test_teacher_weights_table(records, version, staleness, expected):
    got = teacher_weights(records, LEVELS, version, max_rank=R, beta=1.0, staleness=staleness)
    if expected == "equal":
        expected = {r: 1 / 3 for r in LEVELS}
    assert got == pytest.approx(expected)


# ---- the slot core ---------------------------------------------------------------------------


def test_fresh_state_starts_every_slot_as_the_cut_global_and_r_slot_is_the_adapter():
    c = kd_core()
    g = global_adapter()
    assert sorted(c.slots) == list(LEVELS)
    for r in LEVELS:
        for n, t in cut_to_rank(g, r).items():
            assert torch.equal(c.slots[r][n], t)
    assert c.state.slots[R] is c.state.adapter
    glob = c.global_adapter()
    assert glob.method == "kd" and sorted(glob.slots) == list(LEVELS)
    for r in LEVELS:
        assert {n: tuple(t.shape) for n, t in glob.slots[r].items()} == {
            n: SPEC.shape_at_rank(n, r) for n in SPEC.shapes
        }
        assert glob.slot_for_rank(r)[0] == r


def test_update_goes_to_its_slot_only_with_staleness_and_eta():
    c = kd_core(server_lr=0.5)
    c.offer(update("first", 8, seed=3))  # version 1
    before = snapshot(c)
    u = update("u", 4, base=0, seed=7)  # u = 1
    d = c.offer(u)
    assert isinstance(d, Applied) and d.staleness == (1,)
    for n in SPEC.shapes:
        want = before[4][n] + 0.5 * 2**-0.5 * u.tensors[n]
        torch.testing.assert_close(c.slots[4][n], want)
        assert torch.equal(c.slots[2][n], before[2][n]) and torch.equal(c.slots[8][n], before[8][n])
    assert c.state.slot_updates == {8: ((10, 0),), 4: ((10, 0),)}


def test_mixed_buffer_each_slot_gets_its_own_data_weighted_average():
    c = kd_core(buffer_size=3)
    before = snapshot(c)
    u1, u2, u3 = update("a", 2, n=10, seed=1), update("b", 2, n=30, seed=2), update("c", 8, seed=3)
    assert isinstance(c.offer(u1), Buffered) and isinstance(c.offer(u2), Buffered)
    assert isinstance(c.offer(u3), Applied)
    for n in SPEC.shapes:
        want2 = before[2][n] + (10 * u1.tensors[n] + 30 * u2.tensors[n]) / 40
        torch.testing.assert_close(c.slots[2][n], want2)
        torch.testing.assert_close(c.slots[8][n], before[8][n] + u3.tensors[n])
        assert torch.equal(c.slots[4][n], before[4][n])  # no update: unchanged by the step
    assert c.state.adapter is c.slots[8]
    assert c.state.slot_updates == {2: ((10, 0), (30, 0)), 8: ((10, 0),)}


@pytest.mark.parametrize("rank", [1, 3, 5, 9])
def test_rank_that_is_not_a_level_is_rejected(rank):
    c = kd_core()
    before = snapshot(c)
    bad = AdapterUpdate("x", "c-x", rank, 0, 10, SPEC.fingerprint, delta(rank, 0))
    d = c.offer(bad)
    assert isinstance(d, Rejected) and d.reason == "bad_rank"
    assert c.version == 0 and c.state.counters["rejected:bad_rank"] == 1
    assert all(torch.equal(before[r][n], c.slots[r][n]) for r in LEVELS for n in SPEC.shapes)


def test_distiller_called_once_per_version_with_teacher_weights_and_result_replaces_slots():
    fake = FakeDistiller()
    c = kd_core(fake, buffer_size=2)
    c.offer(update("a", 2, n=40, seed=1))
    assert fake.calls == []
    c.offer(update("b", 8, n=10, seed=2))  # version 1
    assert len(fake.calls) == 1
    seen_slots, weights = fake.calls[0]
    # n * (r/R)^beta * s(0): slot 2: 40 * 1/4 = 10; slot 8: 10; slot 4 never updated: 0
    assert weights == pytest.approx({2: 0.5, 4: 0.0, 8: 0.5})
    assert sorted(seen_slots) == list(LEVELS)
    for r in LEVELS:  # the result (input + 1) replaced every slot, the R slot is the adapter
        for n in SPEC.shapes:
            torch.testing.assert_close(c.slots[r][n], seen_slots[r][n] + 1.0)
    assert c.state.adapter is c.slots[8] and c.state.counters["kd_distillations"] == 1
    assert c.last_teacher_weights == weights

    c.offer(update("c", 4, n=10, base=0, seed=3))
    c.offer(update("d", 4, n=10, base=1, seed=4))  # version 2: u = 1 and 0
    assert len(fake.calls) == 2
    _, w2 = fake.calls[1]
    # at parent version 1: slot 2: 40/4 * s(1); slot 4: (10 s(1) + 10) / 2; slot 8: 10 * s(1)
    s1 = 2**-0.5
    raw = {2: 10 * s1, 4: (10 * s1 + 10) / 2, 8: 10 * s1}
    assert w2 == pytest.approx({r: v / sum(raw.values()) for r, v in raw.items()})


def test_no_distiller_means_no_distillation():
    c = kd_core(None)
    before = snapshot(c)
    u = update("a", 4, seed=5)
    c.offer(u)
    for n in SPEC.shapes:
        torch.testing.assert_close(c.slots[4][n], before[4][n] + u.tensors[n])
        assert torch.equal(c.slots[2][n], before[2][n])
    assert c.last_teacher_weights == pytest.approx({2: 0.0, 4: 1.0, 8: 0.0})
    assert c.state.counters["kd_distillations"] == 0


def test_duplicates_and_ledger():
    fake = FakeDistiller()
    c = kd_core(fake, buffer_size=2)
    c.offer(update("a", 2))
    assert isinstance(c.offer(update("a", 2)), Duplicate)
    c.offer(update("b", 4))
    after = snapshot(c)
    assert isinstance(c.offer(update("a", 2)), Duplicate)
    assert c.state.applied == {"a": 1, "b": 1} and len(fake.calls) == 1
    assert all(torch.equal(after[r][n], c.slots[r][n]) for r in LEVELS for n in SPEC.shapes)
    assert c.flush() is None and len(fake.calls) == 1


def test_non_finite_distilled_slot_keeps_its_tensors_and_is_counted():
    def poison(slots):
        out = {r: {n: t + 1.0 for n, t in s.items()} for r, s in slots.items()}
        out[4][H] = torch.full_like(out[4][H], math.nan)
        return out

    c = kd_core(FakeDistiller(poison))
    before = snapshot(c)
    c.offer(update("a", 2, seed=1))
    assert all(torch.equal(c.slots[4][n], before[4][n]) for n in SPEC.shapes)
    assert c.state.counters["kd_nonfinite"] == 1
    torch.testing.assert_close(c.slots[8][H], before[8][H] + 1.0)


def test_distiller_changing_names_or_shapes_is_a_bug():
    c = kd_core(FakeDistiller(lambda slots: {r: {H: s[H]} for r, s in slots.items()}))
    with pytest.raises(RuntimeError, match="names or shapes"):
        c.offer(update("a", 2))
    c = kd_core(FakeDistiller(lambda slots: {8: slots[8]}))
    with pytest.raises(RuntimeError, match="returned slots"):
        c.offer(update("b", 2))


def test_resume_from_persisted_slots_and_records():
    c = kd_core(buffer_size=1)
    c.offer(update("a", 2, seed=1))
    c.offer(update("b", 4, seed=2, base=1))
    st = c.state
    persisted = CoreState(
        st.version,
        {n: t.clone() for n, t in st.adapter.items()},
        dict(st.applied),
        st.counters.copy(),
        st.staleness_hist.copy(),
        slots={r: {n: t.clone() for n, t in st.slots[r].items()} for r in (2, 4)},
        slot_updates=dict(st.slot_updates),
    )
    fake = FakeDistiller()
    again = kd_core(fake, state=persisted)
    assert all(torch.equal(again.slots[r][n], c.slots[r][n]) for r in LEVELS for n in SPEC.shapes)
    assert again.state.adapter is again.slots[8]
    assert isinstance(again.offer(update("a", 2)), Duplicate)
    again.offer(update("c", 8, seed=3, base=2))
    assert len(fake.calls) == 1 and set(fake.calls[0][1]) == set(LEVELS)


@pytest.mark.parametrize(
    "kwargs,cfg,match",
    [
        (dict(rank_levels=(2, 4)), {}, "largest kd rank level"),
        (dict(rank_levels=(0, 8)), {}, ">= 1"),
        (dict(rank_levels=(2, 8)), dict(allowed_ranks=frozenset({2, 4, 8})), "differ"),
        ({}, {}, "needs rank levels"),
    ],
)
def test_kd_config_errors(kwargs, cfg, match):
    with pytest.raises(ConfigError, match=match):
        make_core("kd", SPEC, PadConfig(**cfg), CoreState(0, global_adapter()), **kwargs)


def test_levels_default_to_allowed_ranks_and_bad_persisted_slots_are_refused():
    c = make_core(
        "kd", SPEC, PadConfig(allowed_ranks=frozenset({4, 8})), CoreState(0, global_adapter())
    )
    assert c.levels == (4, 8)
    wrong = CoreState(0, global_adapter(), slots={2: cut_to_rank(global_adapter(), 4)})
    with pytest.raises(ConfigError, match="slot 2"):
        kd_core(state=wrong)
    other_top = CoreState(0, global_adapter(), slots={8: global_adapter(seed=5)})
    with pytest.raises(ConfigError, match="differs"):
        kd_core(state=other_top)


# ---- one small real distillation ------------------------------------------------------------

SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "the film is strictly routine .",
    "an exhilarating experience .",
    "it 's a mess , a dull and tedious one .",
    "one of the best films of the year .",
    "a waste of time and talent .",
    "charming and funny from start to finish .",
    "the plot is a tired retread .",
    "beautifully acted and deeply moving .",
    "boring , badly written and too long .",
    "a delightful surprise .",
    "painfully unfunny .",
    "smart , sharp and very entertaining .",
    "nothing here works .",
    "warm , tender and wise .",
    "an ugly , pointless film .",
]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_distillation_changes_slots_keeps_shapes():
    from helora.aggregator.distill import make_distiller
    from helora.worker.model import LoraClassifier, ModelConfig, resolve_model_path

    cfg = ModelConfig(model=resolve_model_path(None), num_labels=2, max_rank=4, max_length=32)
    slots = {
        2: LoraClassifier(cfg, 2, seed=1).adapter_state(),
        4: LoraClassifier(cfg, 4, seed=2).adapter_state(),
    }
    # B is zero at peft's init: give slot 4 a non-trivial LoRA so the slots really disagree
    for n, t in slots[4].items():
        if ".lora_B." in n:
            slots[4][n] = 0.05 * rand(tuple(t.shape), 3)
    distiller = make_distiller(cfg, SENTENCES, steps=3, batch_size=8, lr=1e-3)
    out = distiller({r: dict(s) for r, s in slots.items()}, {2: 0.25, 4: 0.75})
    assert sorted(out) == [2, 4]
    for r in (2, 4):
        assert out[r].keys() == slots[r].keys()
        assert all(out[r][n].shape == slots[r][n].shape for n in slots[r])
        assert all(bool(torch.isfinite(t).all()) for t in out[r].values())
        changed = sum(not torch.equal(out[r][n], slots[r][n]) for n in slots[r])
        assert changed > 0, r
    stats = distiller.last_stats
    assert stats[2]["steps"] == 3 and stats[2]["kd_loss_first"] > 0
    # the models are built once and reused; the mutual teacher mode runs too
    models = dict(distiller.models)
    distiller.teacher = "mutual"
    again = distiller(out, {2: 0.0, 4: 1.0})
    assert all(distiller.models[r] is models[r] for r in models)
    assert any(not torch.equal(again[2][n], out[2][n]) for n in out[2])  # a student, not a teacher
    with pytest.raises(ValueError, match="teacher must be"):
        make_distiller(cfg, SENTENCES, teacher="ensemble")
