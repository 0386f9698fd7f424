"""HeLoRA-KD's mutual distillation step on a public set (HELORA_METHOD.md section 0 item 8).

The only aggregator module that needs a model: it imports helora.worker.model (and through it
transformers/peft); the KD state machine (kd.py) stays pure and receives this as its
``distiller``.

One call (one new version), given the slots {rank: tensors} and teacher weights {rank: w}:
- one LoraClassifier per slot rank (built on first use, then reused) loads its slot; every
  model runs in eval mode (no dropout), teacher and student alike: the reference code's
  dropout-on teacher is not reproduced on purpose;
- ``steps`` batches of ``batch_size`` public texts (no labels needed) are drawn from a generator
  seeded by (seed, call number), so successive versions see different batches;
- teacher = sum_r w_r z_r / sum_r w_r over the slots with w_r > 0 (kd.teacher_logits), no grad:
    ``frozen`` (default): z_r are the logits of the slots AS GIVEN (the version's ensemble), so
        the target does not move while the slots learn;
    ``mutual``: z_r are the slots' current logits at every step (deep mutual learning as in the
        reference code; one forward per slot per step serves as teacher and student);
- every slot (also those with w_r = 0) takes one AdamW step per batch on
      loss_r = T^2 * KL(softmax(teacher / T) || softmax(z_r / T))   (kd.kd_loss)
  over its trainable parameters (LoRA A/B and the classifier head); a fresh AdamW per call;
- returns new tensors (``adapter_state()``): same names and shapes as the input slots.

Why ``frozen`` is the default (measured, SST-2, see make_distiller): without labels, the
``mutual`` target drifts with the students; at lr 1e-3 for 30 steps the slots agreed with one
another (KD loss ~2e-4) but fell from 0.75/0.79 to 0.65/0.66 dev accuracy, while the frozen
teacher lifted the weak slot (0.51 -> 0.76) and kept the others at the ensemble's level.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from helora.aggregator.kd import kd_loss, teacher_logits
from helora.shared.messages import Tensors
from helora.worker.model import LoraClassifier, ModelConfig
from helora.worker.train import mix_seed, seeded_batches

DEFAULT_LR = 1e-3  # measured on SST-2 with MiniLM (see make_distiller)
TEACHER_MODES = ("frozen", "mutual")


class SlotDistiller:
    """The callable ``make_distiller`` returns (see the module doc)."""

    def __init__(
        self,
        model_config: ModelConfig,
        public_texts: Sequence[str],
        *,
        steps: int,
        batch_size: int,
        lr: float,
        temperature: float,
        weight_decay: float,
        seed: int,
        teacher: str,
    ) -> None:
        if teacher not in TEACHER_MODES:
            raise ValueError(f"teacher must be one of {TEACHER_MODES}, got {teacher!r}")
        if steps < 0 or batch_size < 1 or not lr > 0 or not temperature > 0:
            raise ValueError(
                f"invalid distillation settings steps={steps} batch_size={batch_size} "
                f"lr={lr} temperature={temperature}"
            )
        if not public_texts:
            raise ValueError("the public distillation set is empty")
        self.model_config = model_config
        self.texts = list(public_texts)
        self.steps = steps
        self.batch_size = min(batch_size, len(self.texts))
        self.lr = lr
        self.temperature = temperature
        self.weight_decay = weight_decay
        self.seed = seed
        self.teacher = teacher
        self.calls = 0
        self.models: dict[int, LoraClassifier] = {}
        self.last_stats: dict[str, Any] = {}  # per slot: first/last KD loss of the last call

    def _model(self, rank: int) -> LoraClassifier:
        clf = self.models.get(rank)
        if clf is None:
            clf = self.models[rank] = LoraClassifier(self.model_config, rank, seed=self.seed)
        return clf

    def __call__(self, slots: dict[int, Tensors], weights: dict[int, float]) -> dict[int, Tensors]:
        ranks = sorted(slots)
        models = {r: self._model(r) for r in ranks}
        for r in ranks:
            models[r].load_adapter_state(slots[r])
        self.calls += 1
        teachers = [r for r in ranks if weights.get(r, 0.0) > 0]
        if not teachers or self.steps == 0:
            return {r: models[r].adapter_state() for r in ranks}
        optims = {
            r: torch.optim.AdamW(
                [p for p in models[r].model.parameters() if p.requires_grad],
                lr=self.lr,
                weight_decay=self.weight_decay,
            )
            for r in ranks
        }
        tokenizer = models[ranks[0]].tokenizer
        gen = torch.Generator().manual_seed(mix_seed("kd", self.seed, self.calls))
        batches = seeded_batches(len(self.texts), self.batch_size, gen)
        encoded = [
            tokenizer(
                [self.texts[i] for i in next(batches)],
                truncation=True,
                max_length=self.model_config.max_length,
                padding=True,
                return_tensors="pt",
            )
            for _ in range(self.steps)
        ]
        losses: dict[int, list[float]] = {r: [] for r in ranks}
        modes = {r: models[r].model.training for r in ranks}
        try:
            for r in ranks:
                models[r].model.eval()
            frozen: list[torch.Tensor] = []
            if self.teacher == "frozen":  # the teacher of every batch, from the input slots
                with torch.no_grad():  # not inference_mode: kd_loss saves it for backward
                    for enc in encoded:
                        z = {r: models[r].model(**enc).logits for r in teachers}
                        frozen.append(teacher_logits(z, weights))
            for step, enc in enumerate(encoded):
                logits = {r: models[r].model(**enc).logits for r in ranks}
                if frozen:
                    teacher = frozen[step]
                else:  # mutual: the slots' current logits (one forward serves both roles)
                    teacher = teacher_logits({r: logits[r].detach() for r in teachers}, weights)
                for r in ranks:
                    loss = kd_loss(logits[r], teacher, self.temperature)
                    optims[r].zero_grad(set_to_none=True)
                    loss.backward()
                    optims[r].step()
                    losses[r].append(float(loss.detach()))
        finally:
            for r in ranks:
                optims[r].zero_grad(set_to_none=True)
                models[r].model.train(modes[r])
        self.last_stats = {
            r: {"kd_loss_first": v[0], "kd_loss_last": v[-1], "steps": len(v)}
            for r, v in losses.items()
        }
        return {r: models[r].adapter_state() for r in ranks}


def make_distiller(
    model_config: ModelConfig,
    public_texts: Sequence[str],
    *,
    steps: int = 30,
    batch_size: int = 32,
    lr: float = DEFAULT_LR,
    temperature: float = 1.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    teacher: str = "frozen",
) -> SlotDistiller:
    """A ``kd.Distiller``: ``steps`` AdamW steps of slot distillation per version (module doc).

    Defaults measured on SST-2 (public set 2,000 train sentences disjoint from the clients',
    dev.tsv for accuracy) with all-MiniLM-L6-v2, R = 8, max length 64, slots 2/4/8 trained apart
    to dev accuracy 0.51/0.75/0.79 (ensemble 0.79), teacher weights n (r/R) = 1/7, 2/7, 4/7, 30
    steps of batch 32, frozen teacher:
        lr 5e-5 -> 0.51/0.77/0.80; 2e-4 -> 0.51/0.78/0.80 (the weak slot barely moves: its KL to
        the teacher 0.168 -> 0.167 / 0.161); 1e-3 -> 0.76/0.78/0.79, KL 0.031/0.005/0.001,
        a second call 0.78/0.79/0.79; 3e-3 -> 0.78/0.79/0.79 but KL 0.010/0.009/0.006
        (overshoot). About 30 s per call on 2 idle CPU cores.
    5e-5 is the reference code's DistilBERT value for 10 full epochs; a few dozen steps need ~1e-3.
    """
    return SlotDistiller(
        model_config,
        public_texts,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        weight_decay=weight_decay,
        seed=seed,
        teacher=teacher,
    )
