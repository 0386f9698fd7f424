"""The two messages helora exchanges, as plain frozen dataclasses (no I/O, no encoding).

Tensor names are peft's state-dict keys without the adapter name, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
Tensors are CPU float32 once decoded; the wire dtype is a transport choice (see wire.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class AdapterUpdate:
    """A client's delta D_k = trained - received, at the client's own rank."""

    update_id: str  # unique per update (uuid4 hex): de-duplication key
    client_id: str
    rank: int  # r_k: LoRA A tensors are (rank, d_in), B tensors (d_out, rank)
    base_version: int  # tau: the global version the client trained from
    num_examples: int  # n_k: examples behind this update (> 0)
    fingerprint: str  # model/adapter-spec fingerprint; must equal the aggregator's
    tensors: Tensors
    created_at: float = 0.0  # client wall clock, seconds since the epoch (informational)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. train_loss, steps


@dataclass(frozen=True)
class GlobalAdapter:
    """A global version. ``slots`` maps a rank level to an adapter at that rank.

    HeLoRA-Pad and the padding baselines carry one slot at the max rank R; HeLoRA-KD carries
    one slot per configured rank level. A client takes the slot of its own rank if there is
    one, else the largest slot cut to its rank (see ``slot_for_rank``).
    """

    version: int
    parent_version: int  # -1 for version 0
    method: str
    max_rank: int
    fingerprint: str
    slots: dict[int, Tensors]
    update_ids: tuple[str, ...] = ()  # the updates applied to make this version from its parent
    created_at: float = 0.0

    def slot_for_rank(self, rank: int) -> tuple[int, Tensors]:
        if rank in self.slots:
            return rank, self.slots[rank]
        level = max(self.slots)
        return level, self.slots[level]
