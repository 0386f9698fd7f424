"""Cutting and padding LoRA adapters: exact values, linearity, and cut(pad(x)) == x."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helora.shared.lora_ops import Padding, cut_to_rank, pad_to_rank, rank_of, subtract

A = "m.layer.0.query.lora_A.weight"
B = "m.layer.0.query.lora_B.weight"
H = "m.classifier.weight"


def adapter(r: int, d_in: int = 3, d_out: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(r, d_in, generator=g),
        B: torch.randn(d_out, r, generator=g),
        H: torch.randn(2, d_in, generator=g),
    }


def test_cut_takes_first_components_and_copies():
    x = adapter(4)
    cut = cut_to_rank(x, 2)
    assert torch.equal(cut[A], x[A][:2]) and torch.equal(cut[B], x[B][:, :2])
    assert torch.equal(cut[H], x[H])
    cut[A].zero_()
    assert x[A].abs().sum() > 0, "cut must not return views"


@pytest.mark.parametrize("bad", [0, 5])
def test_cut_rejects_impossible_rank(bad):
    with pytest.raises(ValueError):
        cut_to_rank(adapter(4), bad)


def test_padding_values_table():
    a = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # rank 2, d_in 2
    b = torch.tensor([[1.0, 3.0]])  # d_out 1, rank 2
    x = {A: a, B: b}
    expect = {
        Padding.ZERO: ([0.0, 0.0], [0.0]),
        Padding.MEAN: ([3.0, 3.0], [2.0]),  # one scalar: mean of all entries
        Padding.CONTEXT: ([2.0, 4.0], [2.0]),  # mean of the components
        Padding.ADJACENT: ([3.0, 6.0], [3.0]),  # last component
    }
    for mode, (row, col) in expect.items():
        p = pad_to_rank(x, 4, mode)
        assert p[A].shape == (4, 2) and p[B].shape == (1, 4)
        assert torch.equal(p[A][:2], a) and torch.equal(p[B][:, :2], b)
        for i in (2, 3):
            assert p[A][i].tolist() == row, mode
            assert p[B][:, i].tolist() == col, mode


def test_rank_of():
    assert rank_of(adapter(3)) == 3
    bad = adapter(3)
    bad[B] = torch.zeros(2, 2)
    with pytest.raises(ValueError):
        rank_of(bad)


@settings(max_examples=60, deadline=None)
@given(
    r=st.integers(1, 6),
    extra=st.integers(0, 4),
    mode=st.sampled_from(list(Padding)),
    seed=st.integers(0, 10_000),
)
def test_pad_is_linear_and_cut_inverts_it(r, extra, mode, seed):
    x, y = adapter(r, seed=seed), adapter(r, seed=seed + 1)
    big = r + extra
    px, py = pad_to_rank(x, big, mode), pad_to_rank(y, big, mode)
    diff = pad_to_rank(subtract(x, y), big, mode)
    for n in x:
        torch.testing.assert_close(diff[n], px[n] - py[n], rtol=1e-5, atol=1e-5)
    back = cut_to_rank(px, r)
    for n in x:
        assert torch.equal(back[n], x[n])
