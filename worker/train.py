"""Local training (E optimizer steps of AdamW) and evaluation of a LoraClassifier.

Texts are tokenised per batch (truncation to the model's max_length, dynamic padding). Batches are
drawn from a generator seeded with (TrainConfig.seed, step), so successive rounds of one client see
different batches and a run is reproducible. Dropout draws from torch's global generator, which is
seeded the same way inside a forked RNG state (the caller's RNG is left untouched).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from helora.worker.model import LoraClassifier


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20  # E local optimizer steps
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0


def mix_seed(*parts: object) -> int:
    """A 63-bit seed from parts joined with ':' (e.g. (seed, step) or ("kd", seed, call))."""
    text = ":".join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of ``batch_size`` indices, walking through fresh permutations of 0..n-1."""
    pool: list[int] = []
    while True:
        while len(pool) < batch_size:
            pool.extend(torch.randperm(n, generator=gen).tolist())
        yield pool[:batch_size]
        del pool[:batch_size]


def _encode(clf: LoraClassifier, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return clf.tokenizer(
        list(texts),
        truncation=True,
        max_length=clf.config.max_length,
        padding=True,
        return_tensors="pt",
    )


def _check_data(texts: Sequence[str], labels: Sequence[int]) -> None:
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise ValueError("no examples")


def train_local(
    clf: LoraClassifier,
    texts: Sequence[str],
    labels: Sequence[int],
    cfg: TrainConfig,
    *,
    step: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """Run up to ``cfg.steps`` AdamW steps on the trainable parameters (LoRA A/B and the head).

    ``step`` distinguishes successive calls (e.g. the round or base version) in the batch seed.
    ``should_stop`` is polled before every step; training ends early when it returns True.
    Returns ``train_loss`` (mean over the steps taken; NaN if none), ``steps`` and
    ``examples_seen``.
    """
    _check_data(texts, labels)
    if cfg.steps < 0 or cfg.batch_size < 1:
        raise ValueError(f"invalid train config {cfg}")
    model = clf.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    seed = mix_seed(cfg.seed, step)
    gen = torch.Generator().manual_seed(seed)
    batches = seeded_batches(len(texts), min(cfg.batch_size, len(texts)), gen)

    was_training = model.training
    model.train()
    total_loss = 0.0
    done = 0
    seen = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(cfg.steps):
                if should_stop is not None and should_stop():
                    break
                idx = next(batches)
                enc = _encode(clf, [texts[i] for i in idx])
                target = torch.tensor([int(labels[i]) for i in idx], dtype=torch.long)
                loss = model(**enc, labels=target).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach())
                done += 1
                seen += len(idx)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return {
        "train_loss": total_loss / done if done else math.nan,
        "steps": done,
        "examples_seen": seen,
    }


def predict_logits(
    clf: LoraClassifier, texts: Sequence[str], *, batch_size: int = 64
) -> torch.Tensor:
    """The logits of ``clf`` on ``texts`` (N x num_labels, float32), in eval mode."""
    if not texts:
        raise ValueError("no texts to predict")
    model = clf.model
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = _encode(clf, texts[start : start + batch_size])
                out.append(model(**enc).logits.float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def evaluate(
    clf: LoraClassifier,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``clf`` on the examples, in eval mode."""
    _check_data(texts, labels)
    logits = predict_logits(clf, texts, batch_size=batch_size)
    return logits_metrics(logits, labels)


def logits_metrics(logits: torch.Tensor, labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and mean cross-entropy of precomputed logits (e.g. an ensemble's)."""
    target = torch.tensor([int(y) for y in labels], dtype=torch.long)
    if logits.shape[0] != target.shape[0]:
        raise ValueError(f"{logits.shape[0]} logits for {target.shape[0]} labels")
    loss = float(torch.nn.functional.cross_entropy(logits, target, reduction="mean"))
    correct = int((logits.argmax(dim=-1) == target).sum())
    return {"accuracy": correct / len(target), "loss": loss}
