"""Wiring: settings -> model, data, services. The only place that joins worker code (models)
with the aggregator service, which itself never imports transformers or peft."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import torch

from helora.shared.errors import ConfigError
from helora.shared.lora_ops import cut_to_rank
from helora.shared.messages import Tensors
from helora.shared.settings import Settings
from helora.shared.spec import AdapterSpec

log = structlog.get_logger(__name__)


def set_torch_threads(n: int) -> None:
    """One intra-op thread per process by default: several workers share 2 cores."""
    if n > 0:
        torch.set_num_threads(n)


def model_config(settings: Settings, num_labels: int) -> Any:
    from helora.worker.model import ModelConfig, quiet_transformers, resolve_model_path

    quiet_transformers()
    m = settings.model
    return ModelConfig(
        model=resolve_model_path(m.model),
        num_labels=num_labels,
        max_rank=m.max_rank,
        lora_alpha=m.lora_alpha,
        target_modules=tuple(m.target_modules),
        max_length=m.max_length,
    )


def build_aggregator(settings: Settings, num_labels: int) -> Any:
    from helora.aggregator.service import AggregatorService
    from helora.worker.model import LoraClassifier

    cfg = model_config(settings, num_labels)
    clf = LoraClassifier(cfg, rank=cfg.max_rank, seed=settings.model.seed)
    initial = clf.adapter_state()  # peft's init (A kaiming, B = 0) + a seeded random head
    spec = AdapterSpec.from_tensors(cfg.model, initial, cfg.lora_alpha)
    adapter_config = clf.peft_config_dict()
    del clf
    return AggregatorService(
        settings, spec, adapter_config, lambda: initial, distiller=_kd_distiller(settings, cfg)
    )


def _kd_distiller(settings: Settings, cfg: Any) -> Any:
    """HeLoRA-KD's mutual distillation on the public split of ``aggregator.kd_data``."""
    a = settings.aggregator
    if a.method != "kd":
        return None
    if not a.kd_data:
        raise ConfigError(
            "--method kd needs --kd-data: the dataset whose public split (disjoint "
            "from every client's training pool) is distilled on"
        )
    from helora.aggregator.distill import make_distiller
    from helora.worker.data import load_federated_data

    data = load_federated_data(
        a.kd_data, public_size=a.kd_public_size, seed=settings.worker.data_seed
    )
    log.info("kd_public_set", examples=len(data.public), source=a.kd_data)
    return make_distiller(
        cfg,
        data.public.texts,
        steps=a.kd_steps,
        batch_size=a.kd_batch_size,
        lr=a.kd_lr,
        temperature=a.kd_temperature,
        seed=settings.model.seed,
    )


def build_worker(settings: Settings) -> Any:
    from helora.worker.client import WorkerClient
    from helora.worker.data import client_partition, load_federated_data, parse_partition
    from helora.worker.model import LoraClassifier

    w = settings.worker
    if w.rank > settings.model.max_rank:
        raise ConfigError(f"--rank {w.rank} exceeds --max-rank {settings.model.max_rank}")
    index, total = parse_partition(w.partition)
    data = load_federated_data(w.data, max_train=w.max_train, seed=w.data_seed)
    part = client_partition(data, index, total, scheme=w.scheme, alpha=w.alpha, seed=w.data_seed)
    cfg = model_config(settings, data.train.num_labels)
    clf = LoraClassifier(cfg, rank=w.rank, seed=settings.model.seed)
    spec = AdapterSpec.from_rank_adapter(
        cfg.model, clf.adapter_state(), cfg.max_rank, cfg.lora_alpha
    )
    log.info(
        "worker_ready",
        client=w.client_id,
        rank=w.rank,
        partition=w.partition,
        examples=len(part),
        labels=data.train.num_labels,
    )
    return WorkerClient(settings, clf, part, spec)


def evaluate_adapter(
    settings: Settings, adapter: Tensors, texts: Any, labels: Any, num_labels: int, ranks: list[int]
) -> dict[int, float]:
    """Accuracy of a rank-R global adapter cut to each rank, on a held-out split."""
    from helora.worker.model import LoraClassifier
    from helora.worker.train import evaluate

    cfg = model_config(settings, num_labels)
    out: dict[int, float] = {}
    for r in sorted(set(ranks)):
        clf = LoraClassifier(cfg, rank=r, seed=settings.model.seed)
        clf.load_adapter_state(cut_to_rank(adapter, r))
        out[r] = float(evaluate(clf, texts, labels)["accuracy"])
    return out


def checkpoint_adapter(path: Path) -> Tensors:
    from helora.aggregator.checkpoint import load_checkpoint

    return load_checkpoint(path).adapter
