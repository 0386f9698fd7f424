"""Checkpoints are PEFT-format directories, written atomically, pruned, and resumable."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from helora.aggregator.checkpoint import Checkpoint, CheckpointStore, load_checkpoint
from helora.shared.errors import CheckpointError

A = "base_model.model.l.query.lora_A.weight"


def ckpt(version: int) -> Checkpoint:
    return Checkpoint(
        version=version,
        parent_version=version - 1,
        method="pad",
        max_rank=4,
        fingerprint="sha256:x",
        adapter={A: torch.full((4, 3), float(version))},
        update_ids=(f"u{version}",),
        ledger={f"u{v}": v for v in range(1, version + 1)},
        counters=Counter(applied=version),
        staleness_hist=Counter({0: version}),
    )


def test_save_and_load_latest_round_trip(tmp_path):
    store = CheckpointStore(tmp_path, adapter_config={"r": 4, "peft_type": "LORA"})
    for v in range(3):
        store.save(ckpt(v))
    got = store.load_latest()
    assert got.version == 2 and got.update_ids == ("u2",)
    assert torch.equal(got.adapter[A], torch.full((4, 3), 2.0))
    assert got.ledger == {"u1": 1, "u2": 2} and got.counters["applied"] == 2
    assert got.staleness_hist == Counter({0: 2})
    assert json.loads((got.path / "adapter_config.json").read_text())["r"] == 4


def test_prunes_to_keep_and_never_the_latest(tmp_path):
    store = CheckpointStore(tmp_path, adapter_config={}, keep=2)
    for v in range(5):
        store.save(ckpt(v))
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v00000003", "v00000004"]


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, adapter_config={})
    store.save(ckpt(1))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("helora.aggregator.checkpoint.os.rename", boom)
    with pytest.raises(OSError):
        store.save(ckpt(2))
    monkeypatch.undo()
    assert any(tmp_path.glob(".tmp-*"))  # the half-written directory
    reopened = CheckpointStore(tmp_path, adapter_config={})
    assert not any(tmp_path.glob(".tmp-*"))  # cleaned on start
    assert reopened.load_latest().version == 1


def test_empty_store_and_corrupt_pointer(tmp_path):
    store = CheckpointStore(tmp_path, adapter_config={})
    assert store.load_latest() is None
    (tmp_path / "LATEST").write_text("{not json")
    with pytest.raises(CheckpointError):
        store.load_latest()


def test_unreadable_checkpoint_raises(tmp_path):
    (tmp_path / "v00000001").mkdir()
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "v00000001")
