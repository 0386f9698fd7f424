"""Pure tensor operations on LoRA adapters (HELORA_METHOD.md section 0, items 1-4).

An adapter is a ``{name: tensor}`` map with peft's key names. For each adapted matrix there is
an ``...lora_A.weight`` of shape (r, d_in) and a ``...lora_B.weight`` of shape (d_out, r);
"component i" is row i of A together with column i of B. Every other tensor (the classifier
head) is "full" and is never cut or padded.

Every padding mode is a linear map of the adapter, so padding a delta is exact:
pad(X) - pad(Y) == pad(X - Y). Cutting is the left inverse of padding: cut(pad(X, R), r) == X.
"""

from __future__ import annotations

from enum import StrEnum

import torch

from helora.shared.messages import Tensors

LORA_A = ".lora_A."
LORA_B = ".lora_B."


class Padding(StrEnum):
    ZERO = "zero"  # missing components are zero (default; the study found context worse at R)
    MEAN = "mean"  # one scalar: the mean of all entries of the matrix
    CONTEXT = "context"  # each missing component = mean of the client's own components
    ADJACENT = "adjacent"  # copy of the last existing component


def is_lora_a(name: str) -> bool:
    return LORA_A in name


def is_lora_b(name: str) -> bool:
    return LORA_B in name


def is_full(name: str) -> bool:
    """True for tensors that are not LoRA factors (e.g. the classifier head)."""
    return not (is_lora_a(name) or is_lora_b(name))


def rank_of(tensors: Tensors) -> int:
    """The LoRA rank of an adapter; raises ValueError if its factors disagree or there are none."""
    ranks = {t.shape[0] for n, t in tensors.items() if is_lora_a(n)}
    ranks |= {t.shape[1] for n, t in tensors.items() if is_lora_b(n)}
    if len(ranks) != 1:
        raise ValueError(f"adapter has inconsistent or no LoRA ranks: {sorted(ranks)}")
    return ranks.pop()


def cut_to_rank(tensors: Tensors, rank: int) -> Tensors:
    """The first ``rank`` components of every LoRA pair (A[:r], B[:, :r]); full tensors as is.

    Returns new contiguous tensors, never views into the input.
    """
    out: Tensors = {}
    for name, t in tensors.items():
        if is_lora_a(name):
            _check_rank(name, t.shape[0], rank)
            out[name] = t[:rank].clone()
        elif is_lora_b(name):
            _check_rank(name, t.shape[1], rank)
            out[name] = t[:, :rank].clone()
        else:
            out[name] = t.clone()
    return out


def _check_rank(name: str, have: int, want: int) -> None:
    if want < 1 or want > have:
        raise ValueError(f"cannot cut {name} of rank {have} to rank {want}")


def _pad_rows(a: torch.Tensor, target: int, mode: Padding) -> torch.Tensor:
    """Pad an A-like (r, d) matrix with target - r rows chosen by ``mode``."""
    r = a.shape[0]
    missing = target - r
    if missing < 0:
        raise ValueError(f"cannot pad rank {r} down to {target}")
    if missing == 0:
        return a.clone()
    if mode is Padding.ZERO:
        fill = torch.zeros(missing, a.shape[1], dtype=a.dtype)
    elif mode is Padding.MEAN:
        fill = a.mean().expand(missing, a.shape[1])
    elif mode is Padding.CONTEXT:
        fill = a.mean(dim=0, keepdim=True).expand(missing, -1)
    elif mode is Padding.ADJACENT:
        fill = a[-1:].expand(missing, -1)
    else:  # pragma: no cover - StrEnum exhausts the cases
        raise ValueError(f"unknown padding {mode!r}")
    return torch.cat([a, fill], dim=0)


def pad_to_rank(tensors: Tensors, target: int, mode: Padding | str = Padding.ZERO) -> Tensors:
    """Pad every LoRA pair of a rank-r adapter (or delta) to rank ``target``; full tensors as is."""
    mode = Padding(mode)
    out: Tensors = {}
    for name, t in tensors.items():
        if is_lora_a(name):
            out[name] = _pad_rows(t, target, mode)
        elif is_lora_b(name):
            out[name] = _pad_rows(t.T, target, mode).T.contiguous()
        else:
            out[name] = t.clone()
    return out


def subtract(a: Tensors, b: Tensors) -> Tensors:
    """a - b, tensor by tensor; the key sets and shapes must match."""
    if a.keys() != b.keys():
        raise ValueError(f"key sets differ: {sorted(a.keys() ^ b.keys())[:5]}")
    return {n: a[n] - b[n] for n in a}


def clone_tensors(tensors: Tensors) -> Tensors:
    """Detached, contiguous CPU float32 copies (peft's state dicts hold live parameters)."""
    return {n: t.detach().to("cpu", torch.float32).clone().contiguous() for n, t in tensors.items()}
