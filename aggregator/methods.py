"""The aggregation methods the core and the service can run, selected by name.

Every method returns an object with the AggregatorCore interface: ``offer(update) -> Decision``,
``flush() -> Applied | None``, ``global_adapter(...) -> GlobalAdapter``, ``state``, ``version``,
``buffer_fill``, ``method``.
"""

from __future__ import annotations

from helora.aggregator.core import AggregatorCore, CoreState, PadConfig
from helora.shared.errors import ConfigError
from helora.shared.spec import AdapterSpec

METHODS = ("pad",)


def make_core(method: str, spec: AdapterSpec, config: PadConfig, state: CoreState,
              **kwargs: object) -> AggregatorCore:
    if method == "pad":
        return AggregatorCore(spec, config, state)
    raise ConfigError(f"unknown aggregation method {method!r}; choose from {', '.join(METHODS)}")
