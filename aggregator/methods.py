"""The aggregation methods the core and the service can run, selected by name.

Every method returns an AggregatorCore (or subclass): ``offer(update) -> Decision``,
``flush() -> Applied | None``, ``global_adapter(...) -> GlobalAdapter``, ``state``, ``version``,
``buffer_fill``, ``pending_ids()``, ``method``. All share the core's validation, staleness
factor and cut-off, K-update buffers, server lr and ledger (PadConfig); they differ in how one
buffer is aggregated:

- ``pad``: HeLoRA-Pad, padding x weighting as configured (strategies.py).
- ``zeropad``: naive heterogeneous padding. FORCES padding=zero and weighting=data, whatever the
  config says: global += eta * sum_k s_k n_k zeropad(D_k) / sum_k n_k.
- ``fedavg``: the homogeneous FedAvg/FedBuff baseline. The same rule as ``zeropad`` (forced zero
  padding, data weights); homogeneity comes from the clients, which all run one rank (r_min or
  r_max, with R set accordingly), so no padding ever happens.
- ``hetlora``: HetLoRA's norm-weighted aggregation of zero-padded deltas (baselines.py).
- ``flexlora``: FlexLoRA's data-weighted full-size products, SVD back to rank R (baselines.py).
- ``kd``: HeLoRA-KD, one slot per rank level plus mutual distillation (kd.py). Keyword arguments:
  ``rank_levels`` (e.g. (2, 4, 8); default: config.allowed_ranks; the largest must be R) and
  ``distiller`` (distill.make_distiller(...), or None for no distillation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from helora.aggregator.baselines import FlexLoRACore, HetLoRACore
from helora.aggregator.core import AggregatorCore, CoreState, PadConfig
from helora.aggregator.kd import Distiller, KDCore
from helora.aggregator.strategies import Weighting
from helora.shared.errors import ConfigError
from helora.shared.lora_ops import Padding
from helora.shared.settings import Settings
from helora.shared.spec import AdapterSpec

METHODS = ("pad", "zeropad", "fedavg", "hetlora", "flexlora", "kd")


def make_core(
    method: str,
    spec: AdapterSpec,
    config: PadConfig,
    state: CoreState,
    *,
    rank_levels: Iterable[int] | None = None,
    distiller: Distiller | None = None,
) -> AggregatorCore:
    """The core of ``method`` (module doc). KD-only keyword arguments are refused elsewhere."""
    if method != "kd" and (rank_levels is not None or distiller is not None):
        raise ConfigError(f"rank_levels/distiller only apply to method 'kd', not {method!r}")
    if method == "pad":
        return AggregatorCore(spec, config, state)
    if method in ("zeropad", "fedavg"):
        forced = replace(config, padding=Padding.ZERO, weighting=Weighting.DATA)
        return AggregatorCore(spec, forced, state, method=method)
    if method == "hetlora":
        return HetLoRACore(spec, config, state)
    if method == "flexlora":
        return FlexLoRACore(spec, config, state)
    if method == "kd":
        return KDCore(spec, config, state, rank_levels=rank_levels, distiller=distiller)
    raise ConfigError(f"unknown aggregation method {method!r}; choose from {', '.join(METHODS)}")


def pad_config(settings: Settings) -> PadConfig:
    """The core's PadConfig from the aggregator settings."""
    a = settings.aggregator
    return PadConfig(
        padding=a.padding,
        weighting=a.weighting,
        beta=a.beta,
        staleness=a.staleness,
        staleness_a=a.staleness_a,
        hinge_b=a.hinge_b,
        max_staleness=a.max_staleness,
        buffer_size=a.buffer_size,
        server_lr=a.server_lr,
        allowed_ranks=frozenset(a.allowed_ranks) or None,
    )
