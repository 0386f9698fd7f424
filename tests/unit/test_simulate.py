"""The virtual-clock simulation: event order, staleness, availability, sync rounds, determinism."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from helora.shared.spec import AdapterSpec
from helora.simulate import SimConfig, Simulation, make_clients, run_simulation
from tests.conftest import TINY_SIMULATION, data_dir

R = 8
NAMES = ("m.l0.query.lora_A.weight", "m.l0.query.lora_B.weight", "m.classifier.weight")


def fake_initial() -> dict[str, torch.Tensor]:
    return {
        NAMES[0]: torch.zeros(R, 4),
        NAMES[1]: torch.zeros(4, R),
        NAMES[2]: torch.zeros(2, 4),
    }


def fake_trainer(client, received, round_index):
    """A delta of the client's rank: 0.01 everywhere (shapes follow the received adapter)."""
    delta = {n: torch.full_like(t, 0.01) for n, t in received.items()}
    return delta, {"train_loss": 0.5, "steps": 1.0}


class FakeEvaluator:
    """Accuracy = 0.5 + 0.05 * (sum of the head), so it grows with every applied update."""

    def __call__(self, g, ranks):
        _, slot = g.slot_for_rank(R)
        acc = min(1.0, 0.5 + 0.05 * float(slot[NAMES[2]].sum()))
        return {r: acc for r in ranks}


def simulate(*, core_kwargs=None, ensemble=None, **kw) -> Simulation:
    defaults = dict(
        method="pad",
        num_clients=4,
        ranks=(2, 4, 8),
        local_steps=10,
        buffer_size=2,
        max_versions=6,
        straggler_fraction=0.25,
        straggler_factor=5.0,
        jitter=0.1,
        eval_every=1,
    )
    defaults.update(kw)
    cfg = SimConfig(**defaults)
    initial = fake_initial()
    spec = AdapterSpec.from_tensors("fake", initial, 16.0)
    clients = make_clients(cfg, [100 + 10 * k for k in range(cfg.num_clients)])
    return Simulation(
        cfg,
        spec,
        initial,
        clients,
        fake_trainer,
        FakeEvaluator(),
        core_kwargs=core_kwargs,
        ensemble=ensemble,
    )


def test_updates_arrive_in_virtual_time_order_and_versions_advance():
    sim = simulate()
    result = sim.run()
    arrivals = [e["arrive"] for e in sim.log]
    assert arrivals == sorted(arrivals)
    assert all(e["arrive"] >= e["finish"] >= e["start"] for e in sim.log)
    assert result["versions"] == 6 and result["updates"] == 12
    assert sim.version_times == sorted(sim.version_times)
    times = [p[0] for p in result["curve"]]
    assert times == sorted(times) and result["curve"][0][:2] == [0.0, 0]
    assert result["bytes_sent"] > 0 and result["rejected"] == 0


def test_stragglers_produce_stale_updates_and_fast_clients_update_more():
    sim = simulate(max_versions=10)
    sim.run()
    by_client = defaultdict(list)
    for e in sim.log:
        by_client[e["client"]].append(e)
    stragglers = [c for c in sim.clients if c.straggler]
    assert len(stragglers) == 1
    slow = stragglers[0]
    assert max(e["staleness"] for e in by_client[slow.index]) >= 2
    fast = [c for c in sim.clients if not c.straggler]
    assert max(len(by_client[c.index]) for c in fast) > len(by_client[slow.index])


def test_offline_clients_deliver_late_when_back_online():
    sim = simulate(availability=0.5, mean_online=20.0, straggler_fraction=0.0, max_versions=12)
    sim.run()
    late = [e for e in sim.log if e["arrive"] > e["finish"]]
    assert late, "some update should finish while its client is offline"
    for e in late:
        c = sim.clients[e["client"]]
        # delivered exactly when the client comes back online
        assert c.next_online(e["finish"], 0.5, 20.0) == pytest.approx(e["arrive"])
        assert c.next_online(e["arrive"], 0.5, 20.0) == pytest.approx(e["arrive"])
    # and nobody starts training while offline
    for e in sim.log:
        c = sim.clients[e["client"]]
        assert c.next_online(e["start"], 0.5, 20.0) == pytest.approx(e["start"])


def test_sync_mode_forms_rounds_of_all_online_clients():
    sim = simulate(mode="sync", max_versions=4)
    result = sim.run()
    assert result["versions"] == 4
    assert all(e["staleness"] == 0 for e in sim.log)
    rounds = defaultdict(list)
    for e in sim.log:
        rounds[e["base_version"]].append(e)
    assert sorted(rounds) == [0, 1, 2, 3]
    for v, evs in rounds.items():
        assert sorted(e["client"] for e in evs) == [0, 1, 2, 3]  # everyone online
        assert len({e["start"] for e in evs}) == 1  # one barrier start
        assert sim.version_times[v + 1] == pytest.approx(max(e["arrive"] for e in evs))
    # with availability < 1 a round holds only the clients online at its start
    sim = simulate(mode="sync", max_versions=6, availability=0.5, mean_online=20.0)
    sim.run()
    rounds = defaultdict(list)
    for e in sim.log:
        rounds[e["base_version"]].append(e)
    for evs in rounds.values():
        t0 = evs[0]["start"]
        online = [c.index for c in sim.clients if c.next_online(t0, 0.5, 20.0) == t0]
        assert sorted(e["client"] for e in evs) == online


def test_fake_simulation_is_deterministic_per_seed():
    a, b, c = simulate(seed=3), simulate(seed=3), simulate(seed=4, availability=0.7)
    ra, rb = a.run(), b.run()
    c.run()
    assert ra["curve"] == rb["curve"] and a.log == b.log
    assert a.log != c.log


def test_real_simulation_same_seed_same_result_other_seed_differs():
    cfg = SimConfig(
        data=str(data_dir() / "sst2"),
        **TINY_SIMULATION,
        seed=1,
    )
    first = run_simulation(cfg)
    second = run_simulation(cfg)
    assert first["curve"] == second["curve"]
    assert first["final_adapter_sha"] == second["final_adapter_sha"]
    assert first["per_rank_accuracy"] == second["per_rank_accuracy"]
    assert first["updates"] == 2 and set(first["per_rank_accuracy"]) == {"2", "4"}
    other = run_simulation(SimConfig.from_dict({**cfg.to_dict(), "seed": 2}))
    assert other["final_adapter_sha"] != first["final_adapter_sha"]


def test_kd_result_has_the_slot_ensemble_weighted_as_the_teacher():
    seen = []

    def ensemble(g, weights):
        seen.append((sorted(g.slots), dict(weights)))
        return 0.625

    result = simulate(method="kd", core_kwargs={"rank_levels": (2, 4, 8)}, ensemble=ensemble).run()
    assert result["ensemble_accuracy"] == 0.625
    ((slots, weights),) = seen
    assert slots == [2, 4, 8] and sorted(weights) == [2, 4, 8]
    assert sum(weights.values()) == pytest.approx(1.0) and all(w >= 0 for w in weights.values())
    assert (
        simulate(ensemble=ensemble).run()["ensemble_accuracy"] is None and len(seen) == 1
    )  # one slot: no ensemble
