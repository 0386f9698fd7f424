"""Checkpoints: one PEFT adapter directory per version, written atomically, plus a manifest.

Layout under the checkpoint root:

    v00000012/adapter_config.json        PEFT format: PeftModel.from_pretrained(base, this dir)
    v00000012/adapter_model.safetensors
    v00000012/manifest.json              version, parent, method, R, fingerprint, update ids,
                                         counters, staleness histogram
    v00000012/ledger.json                every applied update id -> the version that applied it
    v00000012/slot-r2/...                HeLoRA-KD: one PEFT adapter directory per slot below R
    v00000012/history.safetensors        FlexLoRA: the factors of the last u_max versions
    LATEST                               the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, fsynced, renamed into place, and only then
is LATEST replaced (os.replace, atomic on POSIX). A crash at any point leaves the previous
checkpoint and LATEST intact; leftover temporary directories are removed on the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from helora.shared.errors import CheckpointError
from helora.shared.messages import Tensors

LATEST = "LATEST"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
LEDGER_FILE = "ledger.json"
HISTORY_FILE = "history.safetensors"


@dataclass
class Checkpoint:
    version: int
    parent_version: int
    method: str
    max_rank: int
    fingerprint: str
    adapter: Tensors
    update_ids: tuple[str, ...] = ()
    ledger: dict[str, int] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    staleness_hist: Counter[int] = field(default_factory=Counter)
    created_at: float = 0.0
    path: Path | None = None
    # HeLoRA-KD: the slots below R (slot R is ``adapter``) and the teacher-weight record
    slots: dict[int, Tensors] = field(default_factory=dict)
    slot_updates: dict[int, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    # FlexLoRA: the factors of recent versions (to rebuild stale clients' products)
    history: dict[int, Tensors] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {
            "slots": sorted(self.slots),
            "slot_updates": {str(k): [list(p) for p in v] for k, v in self.slot_updates.items()},
            "version": self.version,
            "parent_version": self.parent_version,
            "method": self.method,
            "max_rank": self.max_rank,
            "fingerprint": self.fingerprint,
            "update_ids": list(self.update_ids),
            "counters": dict(self.counters),
            "staleness_hist": {str(k): v for k, v in sorted(self.staleness_hist.items())},
            "created_at": self.created_at,
        }


class CheckpointStore:
    def __init__(self, root: Path, *, adapter_config: dict[str, Any], keep: int = 3) -> None:
        self.root = Path(root)
        self.adapter_config = adapter_config
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def save(self, ckpt: Checkpoint) -> Path:
        name = f"v{ckpt.version:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        tmp.mkdir()
        save_file(
            {n: t.contiguous() for n, t in ckpt.adapter.items()},
            str(tmp / ADAPTER_FILE),
            metadata={"format": "pt"},
        )
        _write_json(tmp / CONFIG_FILE, self.adapter_config)
        _write_json(tmp / MANIFEST_FILE, ckpt.manifest())
        _write_json(tmp / LEDGER_FILE, ckpt.ledger)
        for level, tensors in ckpt.slots.items():  # one PEFT adapter directory per KD slot
            slot_dir = tmp / f"slot-r{level}"
            slot_dir.mkdir()
            save_file(
                {n: t.contiguous() for n, t in tensors.items()},
                str(slot_dir / ADAPTER_FILE),
                metadata={"format": "pt"},
            )
            _write_json(slot_dir / CONFIG_FILE, self._config_at_rank(level, ckpt.max_rank))
        if ckpt.history:
            flat = {
                f"v{v}/{n}": t.contiguous() for v, ts in ckpt.history.items() for n, t in ts.items()
            }
            save_file(flat, str(tmp / HISTORY_FILE))
        _fsync(tmp / ADAPTER_FILE)
        if final.exists():  # a crash after rename but before LATEST: same version, rewrite it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        _write_json(self.root / LATEST, {"checkpoint": name}, atomic=True)
        ckpt.path = final
        self._prune()
        return final

    def _config_at_rank(self, rank: int, max_rank: int) -> dict[str, Any]:
        """adapter_config.json of a slot: rank r, and alpha scaled so the scale stays alpha/R."""
        cfg = dict(self.adapter_config)
        if "r" in cfg:
            cfg["r"] = rank
        if "lora_alpha" in cfg:
            cfg["lora_alpha"] = cfg["lora_alpha"] * rank / max_rank
        return cfg

    def latest_path(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{pointer} is corrupt: {exc}") from exc
        return self.root / name

    def latest_version(self) -> int | None:
        """The newest checkpointed version, from the LATEST pointer alone (cheap)."""
        path = self.latest_path()
        return None if path is None else int(path.name[1:])

    def load_latest(self) -> Checkpoint | None:
        path = self.latest_path()
        return None if path is None else load_checkpoint(path)

    def _prune(self) -> None:
        versions = sorted(p for p in self.root.glob("v*") if p.is_dir())
        for old in versions[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        ledger = json.loads((path / LEDGER_FILE).read_text())
        adapter = load_file(str(path / ADAPTER_FILE))
        slots = {
            int(level): load_file(str(path / f"slot-r{level}" / ADAPTER_FILE))
            for level in manifest.get("slots", [])
        }
        history: dict[int, Tensors] = {}
        if (path / HISTORY_FILE).exists():
            for key, t in load_file(str(path / HISTORY_FILE)).items():
                version, name = key.split("/", 1)
                history.setdefault(int(version[1:]), {})[name] = t
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    return Checkpoint(
        version=manifest["version"],
        parent_version=manifest["parent_version"],
        method=manifest["method"],
        max_rank=manifest["max_rank"],
        fingerprint=manifest["fingerprint"],
        adapter=adapter,
        update_ids=tuple(manifest["update_ids"]),
        ledger={str(k): int(v) for k, v in ledger.items()},
        counters=Counter(manifest.get("counters", {})),
        staleness_hist=Counter({int(k): v for k, v in manifest.get("staleness_hist", {}).items()}),
        created_at=manifest.get("created_at", 0.0),
        path=path,
        slots=slots,
        slot_updates={
            int(k): tuple(tuple(p) for p in v) for k, v in manifest.get("slot_updates", {}).items()
        },
        history=history,
    )


def write_json_atomic(path: Path, doc: Any) -> None:
    _write_json(path, doc, atomic=True)


def _write_json(path: Path, doc: Any, *, atomic: bool = False) -> None:
    target = path.with_name(path.name + ".tmp") if atomic else path
    with open(target, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(target, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)
