"""Accuracy effect of bfloat16 transport: the same short federated run twice, float32 vs bfloat16.

One rank-4 client (the packaged all-MiniLM-L6-v2, R = 4) on SST-2: every round it loads the
global, trains E local steps, sends ``trained - received`` through ``encode_update`` /
``decode_update`` in the wire dtype under test, and ``AggregatorCore`` (K = 1) applies it. Both runs
use the same seeds, data and batches, so the only difference is the transport rounding of the
deltas. Accuracy is on a held-out slice of SST-2 dev.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch

from helora.aggregator.core import AggregatorCore, Applied, CoreState, PadConfig
from helora.shared.lora_ops import clone_tensors, subtract
from helora.shared.messages import AdapterUpdate
from helora.shared.spec import AdapterSpec
from helora.shared.wire import decode_update, encode_update


@dataclass(frozen=True)
class AccuracyConfig:
    data: str
    max_train: int = 2000
    eval_size: int = 300
    rounds: int = 3
    steps: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    rank: int = 4
    max_length: int = 48  # SST-2 sentences are short; keeps the run near a minute
    threads: int = 1  # two threads were slower on this 2-core machine under load


def run_accuracy(cfg: AccuracyConfig) -> dict[str, Any]:
    from helora.worker.data import load_federated_data
    from helora.worker.model import LoraClassifier, ModelConfig, resolve_model_path
    from helora.worker.train import TrainConfig, evaluate, train_local

    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = load_federated_data(
            cfg.data, max_train=cfg.max_train, eval_size=cfg.eval_size, public_size=0
        )
        mcfg = ModelConfig(
            model=resolve_model_path(None),
            num_labels=data.train.num_labels,
            max_rank=cfg.rank,
            lora_alpha=2.0 * cfg.rank,  # scale alpha / R = 2, as in the demo
            max_length=cfg.max_length,
        )
        clf = LoraClassifier(mcfg, rank=cfg.rank, seed=0)
        initial = clf.adapter_state()
        spec = AdapterSpec.from_tensors(mcfg.model, initial, mcfg.lora_alpha)
        ev_texts, ev_labels = data.eval.texts, data.eval.labels
        result: dict[str, Any] = {
            "initial_accuracy": evaluate(clf, ev_texts, ev_labels)["accuracy"],
            "rounds": cfg.rounds,
            "steps_per_round": cfg.steps,
            "train_examples": len(data.train),
            "eval_examples": len(ev_texts),
        }
        finals = {}
        for dtype in ("float32", "bfloat16"):
            core = AggregatorCore(
                spec, PadConfig(buffer_size=1), CoreState(0, clone_tensors(initial))
            )
            rel_err = []
            for rnd in range(cfg.rounds):
                received = clone_tensors(core.state.adapter)
                clf.load_adapter_state(received)
                train_local(
                    clf,
                    data.train.texts,
                    data.train.labels,
                    TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr),
                    step=rnd,
                )
                delta = subtract(clf.adapter_state(), received)
                update = AdapterUpdate(
                    update_id=uuid.uuid4().hex,
                    client_id="bench",
                    rank=cfg.rank,
                    base_version=core.version,
                    num_examples=cfg.steps * cfg.batch_size,
                    fingerprint=spec.fingerprint,
                    tensors=delta,
                )
                decoded = decode_update(encode_update(update, wire_dtype=dtype))
                rel_err.append(_relative_error(decoded.tensors, delta))
                if not isinstance(core.offer(decoded), Applied):
                    raise AssertionError("K = 1: every update applies a version")
            clf.load_adapter_state(core.state.adapter)
            result[f"{_short(dtype)}_accuracy"] = evaluate(clf, ev_texts, ev_labels)["accuracy"]
            result[f"{_short(dtype)}_delta_relative_error"] = max(rel_err)
            finals[dtype] = core.state.adapter
        result["final_adapter_max_abs_diff"] = max(
            float((finals["float32"][n] - finals["bfloat16"][n]).abs().max()) for n in initial
        )
    finally:
        torch.set_num_threads(previous_threads)
    result["seconds"] = time.perf_counter() - start
    return result


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}[dtype]


def _relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """||got - want|| / ||want|| over the whole adapter (0 for float32 transport)."""
    num = sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want)
    den = sum(float(want[n].double().pow(2).sum()) for n in want)
    return (num / den) ** 0.5 if den else 0.0
