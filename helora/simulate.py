"""`helora simulate`: the aggregator core and the local trainer in one process, on a virtual clock.

Every client k has a rank r_k, a data share, a speed (virtual seconds per local step) and an
availability pattern (seeded alternating online/offline periods). Events are processed in
virtual-time order (a heap keyed by (time, sequence number), so ties are deterministic):

- asynchronous mode: an online, idle client takes the CURRENT global (the slot for its rank, cut to
  its rank), trains E local steps and its update arrives at t + E * step_time(k) (later if it is
  offline then: it is delivered when the client comes back online, so its staleness grows). The
  core (``make_core``) processes arrivals in order; an ``Applied`` decision is a new version at
  that virtual time. Staleness is therefore real.
- synchronous mode: a round barrier. All clients online at the round start train from the same
  version; the round ends when the slowest delivers; the core then flushes, so one round is one
  version and every update is fresh.

Training is real (``train_local`` on a ``LoraClassifier``) but lazy: an update is computed when
it is delivered, from the adapter the client received, so no compute is spent on updates that
arrive after the run stops. One model per distinct rank is shared by all clients of that rank
(clients are stateless between updates: only the adapter is loaded). Tests inject a fake trainer
and evaluator instead of the model.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from helora.aggregator.core import Applied, CoreState, Rejected
from helora.aggregator.methods import make_core
from helora.shared.lora_ops import cut_to_rank, subtract
from helora.shared.messages import AdapterUpdate, GlobalAdapter, Tensors
from helora.shared.spec import AdapterSpec
from helora.shared.wire import encode_update
from helora.sim_clients import (
    EnsembleEvaluator,
    Evaluator,
    SimClient,
    Trainer,
    _Job,
    _uid,
    make_clients,
)
from helora.sim_config import SimConfig
from helora.sim_setup import _data, _initial, _model, method_kwargs, model_config, seed_everything

__all__ = ["SimClient", "SimConfig", "Simulation", "make_clients", "run_simulation"]


class Simulation:
    """The event loop; see the module docstring. ``run()`` returns the result dict."""

    def __init__(
        self,
        cfg: SimConfig,
        spec: AdapterSpec,
        initial: Tensors,
        clients: list[SimClient],
        trainer: Trainer,
        evaluator: Evaluator,
        *,
        core_kwargs: dict[str, Any] | None = None,
        on_version: Callable[[int, float], None] | None = None,
        ensemble: EnsembleEvaluator | None = None,
    ) -> None:
        self.cfg = cfg
        self.ensemble = ensemble
        self.spec = spec
        self.clients = clients
        self.trainer = trainer
        self.evaluator = evaluator
        self.on_version = on_version
        buffer = cfg.buffer_size if cfg.mode == "async" else max(1, len(clients))
        state = CoreState(version=0, adapter={n: t.clone() for n, t in initial.items()})
        self.core = make_core(
            cfg.method, spec, cfg.pad_config(buffer), state, **(core_kwargs or {})
        )
        self.now = 0.0
        self.curve: list[tuple[float, int, float]] = []
        self.log: list[dict[str, Any]] = []
        self.bytes_sent = 0
        self.version_times: list[float] = [0.0]
        self._jitter_rng = random.Random(f"helora-sim/{cfg.seed}/jitter")

    # -- helpers --

    def _online(self, client: SimClient, t: float) -> float:
        return client.next_online(t, self.cfg.availability, self.cfg.mean_online)

    def _start(self, client: SimClient, t: float) -> _Job:
        g = self.core.global_adapter()
        _, slot = g.slot_for_rank(client.rank)
        j = self.cfg.jitter
        factor = 1.0 + (self._jitter_rng.uniform(-j, j) if j > 0 else 0.0)
        finish = t + self.cfg.local_steps * client.base_step_time * factor
        job = _Job(
            client=client,
            base_version=self.core.version,
            received=cut_to_rank(slot, client.rank),
            round_index=client.updates,
            start=t,
            finish=finish,
            deliver=self._online(client, finish),
        )
        client.updates += 1
        return job

    def _deliver(self, job: _Job) -> Any:
        """Train (lazily), encode, offer to the core; returns the core's decision."""
        c = job.client
        delta, metrics = self.trainer(c, job.received, job.round_index)
        update = AdapterUpdate(
            update_id=_uid(self.cfg, c, job.round_index),
            client_id=c.client_id,
            rank=c.rank,
            base_version=job.base_version,
            num_examples=c.num_examples,
            fingerprint=self.spec.fingerprint,
            tensors=delta,
            created_at=job.deliver,
            metrics={k: float(v) for k, v in metrics.items()},
        )
        self.bytes_sent += len(encode_update(update))
        staleness = self.core.version - job.base_version
        decision = self.core.offer(update)
        self.log.append(
            {
                "client": c.index,
                "rank": c.rank,
                "straggler": c.straggler,
                "start": job.start,
                "finish": job.finish,
                "arrive": job.deliver,
                "base_version": job.base_version,
                "staleness": staleness,
                "decision": type(decision).__name__,
                "reason": decision.reason if isinstance(decision, Rejected) else "",
            }
        )
        return decision

    def _new_version(self, t: float) -> None:
        self.version_times.append(t)
        v = self.core.version
        if self.on_version is not None:
            self.on_version(v, t)
        if v % self.cfg.eval_every == 0 or v >= self.cfg.max_versions:
            self._evaluate(t)

    def _evaluate(self, t: float) -> None:
        R = self.cfg.R
        acc = self.evaluator(self.core.global_adapter(), [R])[R]
        self.curve.append((float(t), int(self.core.version), float(acc)))

    def _done(self, t: float) -> bool:
        if self.core.version >= self.cfg.max_versions:
            return True
        cfg = self.cfg
        if cfg.stop_at_target and cfg.target is not None and self.curve:
            if self.curve[-1][2] >= cfg.target:
                return True
        return self.cfg.time_budget is not None and t > self.cfg.time_budget

    # -- the two modes --

    def _run_async(self) -> None:
        heap: list[tuple[float, int, str, Any]] = []
        seq = 0

        def push(t: float, kind: str, payload: Any) -> None:
            nonlocal seq
            heapq.heappush(heap, (t, seq, kind, payload))
            seq += 1

        for c in self.clients:
            push(self._online(c, 0.0), "ready", c)
        while heap:
            t, _, kind, payload = heapq.heappop(heap)
            if self._done(t):
                break
            self.now = t
            if kind == "ready":
                online = self._online(payload, t)
                if online > t:
                    push(online, "ready", payload)
                    continue
                job = self._start(payload, t)
                push(job.deliver, "arrive", job)
            else:
                decision = self._deliver(payload)
                if isinstance(decision, Applied):
                    self._new_version(t)
                push(t, "ready", payload.client)  # idle again: takes the newest global

    def _run_sync(self) -> None:
        t = 0.0
        while not self._done(t):
            online = [c for c in self.clients if self._online(c, t) == t]
            if not online:
                t = min(self._online(c, t) for c in self.clients)
                continue
            jobs = [self._start(c, t) for c in online]
            jobs.sort(key=lambda j: (j.deliver, j.client.index))
            end = jobs[-1].deliver
            if self.cfg.time_budget is not None and end > self.cfg.time_budget:
                break
            self.now = end
            applied = None
            for job in jobs:
                decision = self._deliver(job)
                if isinstance(decision, Applied):
                    applied = decision
            if applied is None:
                applied = self.core.flush()
            if applied is not None:
                self._new_version(end)
            t = end

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self._evaluate(0.0)
        if self.cfg.mode == "async":
            self._run_async()
        else:
            self._run_sync()
        if not self.curve or self.curve[-1][1] != self.core.version:
            self._evaluate(self.version_times[-1])
        g = self.core.global_adapter()
        R = self.cfg.R
        ranks = sorted({c.rank for c in self.clients} - {R})
        per_rank = {int(r): float(a) for r, a in self.evaluator(g, ranks).items()} if ranks else {}
        per_rank[R] = self.curve[-1][2]  # the last evaluation is the final global at R
        per_rank = dict(sorted(per_rank.items()))
        ensemble = None  # KD (several slots): the slots' logits averaged with the teacher weights
        if self.ensemble is not None and len(g.slots) > 1:
            weights = dict(getattr(self.core, "last_teacher_weights", None) or {})
            if not sum(weights.values()) > 0:
                weights = {r: 1.0 for r in g.slots}
            ensemble = float(self.ensemble(g, weights))
        counters = self.core.state.counters
        cfg = self.cfg
        target_time = None
        if cfg.target is not None:
            target_time = next((t for t, _, a in self.curve if a >= cfg.target), None)
        return {
            "method": cfg.method,
            "dataset": Path(cfg.data).name,
            "split": split_name(cfg),
            "seed": cfg.seed,
            "mode": cfg.mode,
            "accuracy": per_rank[cfg.R],
            "per_rank_accuracy": {str(r): a for r, a in per_rank.items()},
            "ensemble_accuracy": ensemble,
            "curve": [list(p) for p in self.curve],
            "bytes_sent": self.bytes_sent,
            "updates": int(counters.get("applied", 0)),
            "rejected": int(sum(v for k, v in counters.items() if k.startswith("rejected"))),
            "versions": int(self.core.version),
            "virtual_time": float(self.version_times[-1]),
            "virtual_time_to_target": target_time,
            "target": cfg.target,
            "staleness_hist": {
                str(k): int(v) for k, v in sorted(Counter(e["staleness"] for e in self.log).items())
            },
            "wall_seconds": time.monotonic() - started,
            "log": self.log,
        }


def split_name(cfg: SimConfig) -> str:
    return "iid" if cfg.scheme == "iid" else f"dir{cfg.alpha:g}"


# ---- the real wiring: data, models, trainer and evaluator ------------------------------------


def run_simulation(
    cfg: SimConfig, *, on_version: Callable[[int, float], None] | None = None
) -> dict[str, Any]:
    """One real simulated federation (model training included); returns the result dict."""
    from helora.aggregator.kd import teacher_logits
    from helora.worker.partition import partition_indices
    from helora.worker.train import (
        TrainConfig,
        evaluate,
        logits_metrics,
        predict_logits,
        train_local,
    )

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    data = _data(cfg)
    parts = partition_indices(
        data.train.labels,
        cfg.num_clients,
        scheme=cfg.scheme,
        alpha=cfg.alpha,
        seed=cfg.seed,
        min_size=cfg.min_client_size,
    )
    shares = [data.train.subset(p) for p in parts]
    mcfg = model_config(cfg, data.train.num_labels)
    initial = _initial(mcfg, cfg.seed)
    spec = AdapterSpec.from_tensors(mcfg.model, initial, mcfg.lora_alpha)
    clients = make_clients(cfg, [len(s) for s in shares], shares)

    def trainer(client: SimClient, received: Tensors, round_index: int):
        clf = _model(mcfg, client.rank)
        clf.load_adapter_state(received)
        tc = TrainConfig(
            steps=cfg.local_steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed * 1_000_003 + client.index,
        )
        metrics = train_local(clf, client.data.texts, client.data.labels, tc, step=round_index)
        return subtract(clf.adapter_state(), received), metrics

    ev_texts, ev_labels = data.eval.texts, data.eval.labels

    def evaluator(g: GlobalAdapter, ranks: Sequence[int]) -> dict[int, float]:
        out = {}
        for r in ranks:
            _, slot = g.slot_for_rank(r)
            clf = _model(mcfg, r)
            clf.load_adapter_state(cut_to_rank(slot, r))
            out[r] = float(evaluate(clf, ev_texts, ev_labels)["accuracy"])
        return out

    def ensemble(g: GlobalAdapter, weights: dict[int, float]) -> float:
        logits = {}
        for r, slot in g.slots.items():
            clf = _model(mcfg, r)
            clf.load_adapter_state(cut_to_rank(slot, r))
            logits[r] = predict_logits(clf, ev_texts)
        return logits_metrics(teacher_logits(logits, weights), ev_labels)["accuracy"]

    kwargs = method_kwargs(cfg, data, mcfg)
    sim = Simulation(
        cfg,
        spec,
        initial,
        clients,
        trainer,
        evaluator,
        core_kwargs=kwargs,
        on_version=on_version,
        ensemble=ensemble,
    )
    started, cpu = time.monotonic(), time.process_time()
    result = sim.run()
    result["wall_seconds"] = time.monotonic() - started
    result["cpu_seconds"] = time.process_time() - cpu  # contention-independent compute
    result["dataset"] = data.name
    result["config"] = cfg.to_dict()
    result["final_adapter_sha"] = adapter_digest(sim.core.global_adapter())
    return result


def adapter_digest(g: GlobalAdapter) -> str:
    h = hashlib.sha256()
    for r in sorted(g.slots):
        for name in sorted(g.slots[r]):
            h.update(name.encode())
            h.update(g.slots[r][name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- the command -----------------------------------------------------------------------------
