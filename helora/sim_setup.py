"""What a simulation runs on: data, models and initial adapters (cached per process), seeds,
and the extra arguments a method's core needs (KD: rank levels and a distiller)."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from helora.shared.messages import Tensors

if TYPE_CHECKING:
    from helora.sim_config import SimConfig


_MODELS: dict[tuple[Any, int], Any] = {}  # (ModelConfig, rank) -> LoraClassifier, shared
_INITIAL: dict[tuple[Any, int], Tensors] = {}
_DATA: dict[tuple[Any, ...], Any] = {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _model(mcfg: Any, rank: int) -> Any:
    from helora.worker.model import LoraClassifier

    key = (mcfg, rank)
    if key not in _MODELS:
        _MODELS[key] = LoraClassifier(mcfg, rank, seed=0)
    return _MODELS[key]


def _initial(mcfg: Any, seed: int) -> Tensors:
    from helora.worker.model import initial_adapter

    key = (mcfg, seed)
    if key not in _INITIAL:
        _INITIAL[key] = initial_adapter(mcfg, seed=seed)
    return {n: t.clone() for n, t in _INITIAL[key].items()}


def _data(cfg: SimConfig) -> Any:
    from helora.worker.data import load_federated_data

    # The eval/public/train-pool split is fixed (seed 0) so every seed is scored on the same
    # held-out examples; the seed varies the client partition, init, batches, speeds, availability.
    key = (cfg.data, cfg.public_size, cfg.eval_size, cfg.max_train)
    if key not in _DATA:
        _DATA[key] = load_federated_data(
            cfg.data,
            public_size=cfg.public_size,
            eval_size=cfg.eval_size,
            max_train=cfg.max_train,
            seed=0,
        )
    return _DATA[key]


def model_config(cfg: SimConfig, num_labels: int) -> Any:
    from helora.worker.model import ModelConfig, quiet_transformers, resolve_model_path

    quiet_transformers()
    return ModelConfig(
        model=resolve_model_path(cfg.model),
        num_labels=num_labels,
        max_rank=cfg.R,
        lora_alpha=cfg.lora_alpha,
        max_length=cfg.max_length,
    )


def method_kwargs(cfg: SimConfig, data: Any, mcfg: Any) -> dict[str, Any]:
    """Extra ``make_core`` kwargs for methods that need them (kd: rank levels + a distiller)."""
    kwargs: dict[str, Any] = dict(cfg.method_options)
    if cfg.method == "kd":
        from helora.aggregator import distill

        levels = sorted(set(cfg.ranks) | {cfg.R})
        kwargs.setdefault("rank_levels", tuple(levels))
        if "distiller" not in kwargs:
            opts = {k[len("distill_") :]: v for k, v in kwargs.items() if k.startswith("distill_")}
            for k in list(kwargs):
                if k.startswith("distill_"):
                    del kwargs[k]
            kwargs["distiller"] = distill.make_distiller(
                model_config=mcfg,
                public_texts=list(data.public.texts),
                seed=cfg.seed,
                **opts,
            )
    return kwargs
