"""The heterogeneous-rank baselines HetLoRA and FlexLoRA, in the async delta protocol (pure torch).

Both keep the core's rules (validation, staleness cut-off, K-update buffers, ledger) and replace
only the aggregation of one buffer. Notation: client k sends the delta D_k = (dA_k, dB_k, dH_k)
at its rank r_k, trained from base version tau_k; s_k = s(t - tau_k) is the staleness factor,
eta the server learning rate, R the max rank, n_k the client's example count.

HetLoRA (Cho et al. 2024), sparsity-weighted aggregation of zero-padded updates:
    S_k = sqrt( sum_m ||(B_m[:, :r_k] + dB_k,m) (A_m[:r_k] + dA_k,m)||_F^2 )
    global += eta * sum_k s_k S_k zeropad(D_k) / sum_k S_k          (head dH weighted the same)
  S_k is the Frobenius norm of the client's TRAINED LoRA product (all adapted matrices viewed as
  one block-diagonal matrix), as in the paper. With deltas the aggregator rebuilds it from the
  current global cut to r_k plus the delta (exact when the update is fresh; for a stale update the
  global moved only by the other clients' additive steps). We do not use the delta product
  ||dB dA||: it drops the first-order terms dB A + B dA, so a client that changed only one factor
  (e.g. A, while B stays at peft's zero init) would get weight 0. The weights are normalised
  without the staleness factor; if every S_k is 0 the data weights n_k are used instead.

FlexLoRA (Bai et al. 2024), SVD redistribution of full-size products:
    W_k     = (B^{tau_k}[:, :r_k] + dB_k) (A^{tau_k}[:r_k] + dA_k)      the client's trained product
    W_cur   = B A                                                       the current global product
    target  = W_cur + eta * sum_k n_k s_k (W_k - W_cur) / sum_k n_k
            (= sum_k w_k s_k W_k + (1 - sum_k w_k s_k) W_cur for eta = 1, w_k = n_k / sum n)
    U S V^T = svd(target);  B = U[:, :R] diag(S[:R]),  A = V^T[:R]      (fixed split; the sign of
            each component is fixed so that the largest-magnitude entry of its A row is positive)
    head   += eta * sum_k n_k s_k dH_k / sum_k n_k                       (as in Pad, data weights)
  With no staleness and eta = 1 this is synchronous FlexLoRA exactly (low-rank clients' products
  only span their r_k components: the dilution is FlexLoRA's own). Because the SVD orders the
  components by singular value, a client of rank r receives A[:r], B[:, :r], the best rank-r
  approximation of the target (Eckart-Young). Every version re-factorises the global, so a stale
  delta must be added to the factors of ITS base version: the core keeps the last u_max versions'
  factors in ``CoreState.history`` and rejects an update whose base it no longer has
  (``base_unavailable``; e.g. after a restart that did not persist the history).
"""

from __future__ import annotations

import math

import torch

from helora.aggregator.core import AggregatorCore, CoreState, PadConfig
from helora.aggregator.strategies import lora_pairs
from helora.shared.lora_ops import Padding, is_full, pad_to_rank
from helora.shared.messages import AdapterUpdate, Tensors
from helora.shared.spec import AdapterSpec


def trained_products(reference: Tensors, delta: Tensors, rank: int) -> dict[str, torch.Tensor]:
    """Per adapted matrix (keyed by its A name): (B[:, :r] + dB)(A[:r] + dA) in float64."""
    out: dict[str, torch.Tensor] = {}
    for a, b in lora_pairs(delta):
        new_b = reference[b][:, :rank].double() + delta[b].double()
        new_a = reference[a][:rank].double() + delta[a].double()
        out[a] = new_b @ new_a
    return out


def hetlora_norm(reference: Tensors, delta: Tensors, rank: int) -> float:
    """S_k: the Frobenius norm of the client's trained LoRA products over all adapted matrices."""
    products = trained_products(reference, delta, rank)
    return math.sqrt(sum(float(w.pow(2).sum()) for w in products.values()))


class HetLoRAAccumulator:
    """Streaming sums of s_k S_k zeropad(D_k) (and of s_k n_k zeropad(D_k) as the fallback)."""

    def __init__(self, max_rank: int, reference: Tensors) -> None:
        self.max_rank = max_rank
        self.reference = reference  # the current global (unchanged while a buffer is open)
        self._by_norm: Tensors = {}
        self._by_data: Tensors = {}
        self._norm_sum = 0.0
        self._data_sum = 0.0
        self.norms: list[float] = []  # S_k in arrival order (for logs and tests; K floats)
        self.count = 0

    def add(self, delta: Tensors, rank: int, num_examples: int, staleness_factor: float) -> None:
        norm = hetlora_norm(self.reference, delta, rank)
        padded = pad_to_rank(delta, self.max_rank, Padding.ZERO)
        for name, t in padded.items():
            _sum_into(self._by_norm, name, t, staleness_factor * norm)
            _sum_into(self._by_data, name, t, staleness_factor * num_examples)
        self._norm_sum += norm
        self._data_sum += num_examples
        self.norms.append(norm)
        self.count += 1

    def result(self) -> Tensors:
        if self.count == 0:
            raise ValueError("no update accumulated")
        if self._norm_sum > 0:
            return {n: t / self._norm_sum for n, t in self._by_norm.items()}
        return {n: t / self._data_sum for n, t in self._by_data.items()}

    def apply(self, adapter: Tensors, eta: float) -> Tensors:
        return {name: adapter[name] + eta * d for name, d in self.result().items()}


def svd_factors(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B = U[:, :R] diag(S[:R]) (d_out x R) and A = V^T[:R] (R x d_in), float32.

    A component with singular value 0 keeps its orthonormal V row in A and a zero column in B
    (like peft's init), so clients can still train it; a pair with both factors zero would get
    no gradient at all. Components beyond min(d_out, d_in) are zero. Signs are deterministic:
    the largest-magnitude entry of each row of A is positive (B A is unchanged by the flip).
    """
    u, s, vh = torch.linalg.svd(target.double(), full_matrices=False)
    k = min(rank, s.numel())
    u, s, vh = u[:, :k], s[:k], vh[:k]
    pivot = vh.abs().argmax(dim=1)
    signs = torch.sign(vh[torch.arange(k), pivot])
    signs[signs == 0] = 1.0
    vh = vh * signs[:, None]
    u = u * signs[None, :]
    b = torch.zeros(target.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, target.shape[1], dtype=torch.float64)
    b[:, :k] = u * s[None, :]
    a[:k] = vh
    return b.to(torch.float32), a.to(torch.float32)


class FlexLoRAAccumulator:
    """Streaming sums of n_k s_k W_k per adapted matrix and of n_k s_k dH_k for full tensors."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self._products: dict[str, torch.Tensor] = {}  # A name -> sum n s W_k (float64)
        self._full: Tensors = {}  # full tensor name -> sum n s dH
        self._ns_sum = 0.0  # sum n_k s_k
        self._n_sum = 0.0  # sum n_k
        self.count = 0

    def add(
        self,
        delta: Tensors,
        rank: int,
        num_examples: int,
        staleness_factor: float,
        *,
        base: Tensors,
    ) -> None:
        """``base`` is the global of the update's base version (its factors at rank R)."""
        alpha = num_examples * staleness_factor
        for a_name, w in trained_products(base, delta, rank).items():
            _sum_into(self._products, a_name, w, alpha)
        for name, t in delta.items():
            if is_full(name):
                _sum_into(self._full, name, t, alpha)
        self._ns_sum += alpha
        self._n_sum += num_examples
        self.count += 1

    def apply(self, adapter: Tensors, eta: float) -> Tensors:
        if self.count == 0:
            raise ValueError("no update accumulated")
        out: Tensors = {}
        for a_name, b_name in lora_pairs(adapter):
            current = adapter[b_name].double() @ adapter[a_name].double()
            step = (self._products[a_name] - self._ns_sum * current) / self._n_sum
            out[b_name], out[a_name] = svd_factors(current + eta * step, self.max_rank)
        for name, t in self._full.items():
            out[name] = adapter[name] + eta * (t / self._n_sum)
        return out


def _sum_into(sums: Tensors, name: str, t: torch.Tensor, alpha: float) -> None:
    acc = sums.get(name)
    if acc is None:
        sums[name] = t.mul(alpha)
    else:
        acc.add_(t, alpha=alpha)


class HetLoRACore(AggregatorCore):
    """HetLoRA: zero padding with weights p_k ~ S_k (module doc). Ignores padding/weighting."""

    method = "hetlora"

    def _new_accumulator(self) -> HetLoRAAccumulator:
        return HetLoRAAccumulator(self.spec.max_rank, self.state.adapter)


class FlexLoRACore(AggregatorCore):
    """FlexLoRA: data-weighted products, SVD back to rank R (module doc).

    Ignores padding/weighting. Keeps ``state.history`` = LoRA factors of the last ``max_staleness``
    versions so that a stale client's product is rebuilt from its own base version.
    """

    method = "flexlora"

    def __init__(
        self, spec: AdapterSpec, config: PadConfig, state: CoreState, *, method: str | None = None
    ) -> None:
        super().__init__(spec, config, state, method=method)
        self._prune_history()

    def _new_accumulator(self) -> FlexLoRAAccumulator:
        return FlexLoRAAccumulator(self.spec.max_rank)

    def _validate(self, u: AdapterUpdate) -> tuple[str, str] | None:
        problem = super()._validate(u)
        if problem is None and self._base(u.base_version) is None:
            return "base_unavailable", f"no factors of base version {u.base_version} kept"
        return problem

    def _accumulate(self, update: AdapterUpdate, delta: Tensors, staleness_factor: float) -> None:
        base = self._base(update.base_version)
        assert base is not None  # _validate checked it
        self._acc.add(delta, update.rank, update.num_examples, staleness_factor, base=base)

    def _apply_buffer(self) -> None:
        factors = {n: t.clone() for n, t in self.state.adapter.items() if not is_full(n)}
        self.state.history[self.state.version] = factors
        super()._apply_buffer()

    def _after_version(self, parent: int) -> None:
        self._prune_history()

    def _base(self, version: int) -> Tensors | None:
        if version == self.state.version:
            return self.state.adapter
        return self.state.history.get(version)

    def _prune_history(self) -> None:
        oldest = self.state.version - self.config.max_staleness
        for v in [v for v in self.state.history if v < oldest or v >= self.state.version]:
            del self.state.history[v]
