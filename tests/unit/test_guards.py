"""The norm guard: absolute bound, bound relative to recent accepted updates, bounded memory."""

import math

import pytest
import torch

from helora.aggregator.guards import NormGuard, adapter_norm


def test_adapter_norm_over_all_tensors():
    assert adapter_norm({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}) == 5.0


def test_absolute_bound_applies_from_the_start():
    g = NormGuard(max_norm=10.0)
    assert g.check(9.0) is None
    assert "max_update_norm" in g.check(11.0)


def test_relative_bound_only_after_history_and_against_the_median():
    g = NormGuard(ratio=10.0, window=5, min_history=3)
    assert g.check(1000.0) is None  # no history yet
    for n in (1.0, 2.0, 3.0):
        g.accepted(n)
    assert g.check(19.0) is None  # 10 x median 2
    assert "median" in g.check(21.0)


def test_window_is_bounded_and_slides():
    g = NormGuard(ratio=10.0, window=3, min_history=3)
    for n in [1.0] * 3 + [100.0] * 3:
        g.accepted(n)
    assert len(g._recent) == 3
    assert g.check(500.0) is None  # the window now holds only the 100s


def test_non_finite_norms_are_left_to_the_core():
    g = NormGuard(max_norm=1.0)
    assert g.check(math.nan) is None and g.check(math.inf) is None


def test_norm_of_huge_finite_values_falls_back_to_float64():
    t = {"a": torch.full((4,), 1e30)}  # float32 squares overflow; the true norm is 2e30
    assert adapter_norm(t) == pytest.approx(2e30, rel=1e-6)
    assert math.isnan(adapter_norm({"a": torch.tensor([math.nan])}))
