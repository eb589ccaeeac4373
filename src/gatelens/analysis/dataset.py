"""Whole data sets: the analyses whose statistics aggregate, run batch by batch and pooled exactly, on this machine
or on a Dask cluster.

:func:`analyze_dataset` splits N sequences into batches of at most ``batch_size`` (each cut to its own longest
sequence), runs :func:`gatelens.analyze` on each (stages regimes, propagation, local, lyapunov), keeps from each
batch only what aggregates and drops its trace, so memory holds one batch and the pooled statistics. Per recurrence,
with n = Σ_b L_b the valid (step, sequence) pairs of all N sequences (L_b: sequence b's length):

    regimes       the counts n_{j,r} of valid steps at which unit j is in regime r, the count of its "looks
                  blocked" steps, and the sums Σ c_j, Σ a_j, Σ g_j, Σ (1 − c_j) of its carry, admit, gate and leak
                  over the valid pairs are added up over batches (in float64); then, as for one batch,
                      census_by_unit[j, r] = n_{j,r} / n        census[r] = (1/U) Σ_j census_by_unit[j, r]
                      c̄_j = Σ c_j / n                          τ_j = 1 / (Σ (1 − c_j) / n)
                  so every mean is weighted by each batch's valid steps and equals the statistic of one batch
                  holding all N sequences
    horizons      per sequence, h_b = the first lag ℓ ≤ min(L_b, max_lag) from its own last step at which
                  ‖∂h_{L_b}/∂h_{L_b−ℓ}‖₂ < eps (σ₁ as the pipeline's propagation computes it), or ∞ (not reached;
                  −1 in ``per_sequence``). The N horizons are pooled as they are; the quantile q is the inverse of
                  their empirical distribution, h_(⌈qN⌉) of the sorted h_(1) ≤ … ≤ h_(N), with the unreached ones
                  sorted last: ∞ when fewer than ⌈qN⌉ sequences reach eps (so a quantile never hides them)
    local         ‖∂⁺h_k/∂θ‖_F of every valid step of every sequence, per block θ and for all blocks together, kept
                  as they are (N·T values per block at most, in the model's dtype); mean, median, p95 and max
                  over the pooled values, as :meth:`LocalGradients.summary` computes them for one batch, and the
                  largest value of a single block with its step and (data set) sequence index
    lyapunov      each sequence's exponents λ_j(b) (the QR method runs per sequence, so they are those of one
                  batch holding all N); over the sequences where λ_j is finite, n_j of them,
                      mean_j = (1/n_j) Σ_b λ_j(b)   stderr_j = sd_j / √n_j,  sd_j² = Σ_b (λ_j(b) − mean_j)² / (n_j − 1)
                  and over the batches i = 1..m, with μ_ij the mean of the finite λ_j(b) of batch i,
                      batch_mean_j = (1/m) Σ_i μ_ij    batch_stderr_j = sd_i(μ_ij) / √m  (unweighted: the last,
                  smaller batch counts as one), NaN with fewer than two values; −inf exponents are counted apart

Credit maps and blocking are not run: their results are per batch (a map over one batch's steps and sequences, the
most severe events of one batch) and do not pool into one statement about the data set; run :func:`gatelens.analyze`
on a batch for them.

Where the batches run: here, one after another (the default); or on Dask, given a ``client``, a ``scheduler``
address or a number of local ``workers``, connected exactly as :func:`gatelens.sweep` connects
(:mod:`gatelens.sweep.cluster`: reachable within ``timeout``, same gatelens and torch on every worker). The model is
sent to every worker once; at most twice as many batches as the cluster has threads are in flight, so the workers'
memory is bounded too. A batch's statistics do not depend on where it ran, and pooling is in batch order, so the
result is the same on any cluster.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gatelens._validation import as_float_tensor, as_lengths
from gatelens.analysis.explain import Explanation, dataset_explanation_of
from gatelens.analysis.local import LocalGradients, finite_statistics
from gatelens.analysis.lyapunov import Lyapunov
from gatelens.analysis.pipeline import (
    STAGES,
    Analysis,
    Listener,
    RecurrenceAnalyses,
    Settings,
    analyze,
    chosen_stages,
)
from gatelens.analysis.propagation import Propagation
from gatelens.analysis.regimes import REGIMES, Regimes, unit_summaries
from gatelens.analysis.serialize import json_list, json_number
from gatelens.model import InitialState, Model
from gatelens.trace import Trace

DEFAULT_BATCH_SIZE = 64  # wide enough for batched products to run near full speed; one trace is O(T · 64 · S)
DATASET_STAGES = ("regimes", "propagation", "local", "lyapunov")  # the stages whose statistics pool exactly
HORIZON_QUANTILES = {"p05": 0.05, "p25": 0.25, "median": 0.5, "p75": 0.75, "p95": 0.95}
IN_FLIGHT_PER_THREAD = 2  # Dask: batches submitted per worker thread at a time (one running, one waiting)


# ---------------------------------------------------------------------------------------------------------------
# What one batch contributes, and how contributions pool.


@dataclass(frozen=True, eq=False)
class PooledRegimes:
    """Regime counts and gate sums per unit, added up over batches (module docstring); the same statistics as
    :class:`~gatelens.Regimes` of one batch holding every sequence, without its per-step arrays."""

    recurrence: str
    unit_labels: list[str]
    thresholds: tuple[float, float]
    long_term: float
    short_term: float
    counts: Tensor  # (U, 4) int64: valid steps of unit j in regime r, columns in the order of REGIMES
    looks: Tensor  # (U,) int64: valid steps where unit j looks blocked (Regimes.looks_blocked)
    sums: dict[str, Tensor]  # "carry", "admit", "gate", "leak" → (U,) float64 sums over the valid pairs
    valid: int  # n: valid (step, sequence) pairs

    @classmethod
    def of(cls, result: Regimes) -> PooledRegimes:
        """One batch's counts and sums."""
        valid = result.valid[..., None]
        counts = torch.stack([(result.codes == code).sum((0, 1)) for code in range(len(REGIMES))], dim=-1)
        lo = result.thresholds[0]
        looks = (result.carry < lo) & (result.gate < lo) & (result.admit >= lo) & valid
        sums = {
            name: torch.where(valid, getattr(result, name), 0.0).sum((0, 1), dtype=torch.float64).cpu()
            for name in ("carry", "admit", "gate", "leak")
        }
        return cls(
            recurrence=result.recurrence,
            unit_labels=result.unit_labels,
            thresholds=result.thresholds,
            long_term=result.long_term,
            short_term=result.short_term,
            counts=counts.long().cpu(),
            looks=looks.sum((0, 1)).long().cpu(),
            sums=sums,
            valid=int(result.valid.sum()),
        )

    @classmethod
    def pool(cls, parts: Sequence[PooledRegimes]) -> PooledRegimes:
        """Counts and sums added up."""
        first = parts[0]
        return cls(
            recurrence=first.recurrence,
            unit_labels=first.unit_labels,
            thresholds=first.thresholds,
            long_term=first.long_term,
            short_term=first.short_term,
            counts=sum((part.counts for part in parts[1:]), first.counts),
            looks=sum((part.looks for part in parts[1:]), first.looks),
            sums={name: sum((part.sums[name] for part in parts[1:]), total) for name, total in first.sums.items()},
            valid=sum(part.valid for part in parts),
        )

    @cached_property
    def census_by_unit(self) -> Tensor:
        """n_{j,r} / n: share of valid steps in each regime, per unit, (U, 4)."""
        return self.counts.double() / self.valid

    @cached_property
    def census(self) -> Tensor:
        """(1/U) Σ_j census_by_unit[j, r]: share of all valid (step, sequence, unit) triples per regime, (4,)."""
        return self.census_by_unit.mean(0)

    @cached_property
    def looks_blocked(self) -> Tensor:
        """Share of valid steps where the unit's own gates say "blocked" but its candidate's row is open, (U,)."""
        return self.looks.double() / self.valid

    @cached_property
    def mean_carry(self) -> Tensor:
        """c̄_j = Σ c_j / n, (U,)."""
        return self.sums["carry"] / self.valid

    @cached_property
    def mean_admit(self) -> Tensor:
        """Σ a_j / n, (U,)."""
        return self.sums["admit"] / self.valid

    @cached_property
    def mean_gate(self) -> Tensor:
        """Σ g_j / n, (U,)."""
        return self.sums["gate"] / self.valid

    @cached_property
    def timescale(self) -> Tensor:
        """τ_j = 1 / (Σ (1 − c_j) / n) in steps, (U,); inf where the leak is 0."""
        return 1.0 / (self.sums["leak"] / self.valid)

    # the labelling rule is the one of Regimes (it reads timescale, long_term, short_term, unit_labels only)
    unit_kind = property(Regimes.unit_kind.func)
    units = Regimes.units

    def to_dict(self) -> dict[str, Any]:
        """Census and per-unit statistics, ready for JSON (an infinite timescale becomes None), as
        :meth:`Regimes.to_dict` gives them, with the number of valid (step, sequence) pairs."""
        return {
            "recurrence": self.recurrence,
            "thresholds": list(self.thresholds),
            "valid_steps": self.valid,
            "census": dict(zip(REGIMES, self.census.tolist())),
            "units": unit_summaries(self),
        }


@dataclass(frozen=True, eq=False)
class PooledHorizons:
    """Each sequence's gradient horizon from its own last step (module docstring), in data order."""

    recurrence: str
    eps: float
    max_lag: int
    per_sequence: Tensor  # (N,) int64: h_b, −1 where not reached within min(L_b, max_lag) lags
    lengths: Tensor  # (N,) int64: L_b

    @classmethod
    def of(cls, trace: Trace, result: Propagation, settings: Settings, *, layer: int | None,
           direction: str | None) -> PooledHorizons:  # fmt: skip
        """One batch's horizons. Steps past a sequence's end are identity lags from the last step T, so its own
        horizon is the one from T less its padding T − L_b; the pipeline computes lags up to max_lag past the
        longest padding, so every lag up to min(L_b, max_lag) is known for every sequence, whatever the batch."""
        steps = trace.recurrence(layer, direction).steps
        batch = result.log_frobenius.shape[2]
        lengths = torch.full((batch,), steps) if trace.lengths is None else trace.lengths.cpu()
        from_end = result.horizon(settings.eps)[0].cpu()
        own = from_end - (steps - lengths)
        reached = (from_end >= 0) & (own <= settings.max_lag)
        return cls(
            recurrence=result.recurrence,
            eps=settings.eps,
            max_lag=settings.max_lag,
            per_sequence=torch.where(reached, own, -1),
            lengths=lengths,
        )

    @classmethod
    def pool(cls, parts: Sequence[PooledHorizons]) -> PooledHorizons:
        """The batches' horizons, concatenated in batch order."""
        first = parts[0]
        return cls(
            recurrence=first.recurrence,
            eps=first.eps,
            max_lag=first.max_lag,
            per_sequence=torch.cat([part.per_sequence for part in parts]),
            lengths=torch.cat([part.lengths for part in parts]),
        )

    @property
    def sequences(self) -> int:
        return len(self.per_sequence)

    @property
    def reached(self) -> int:
        """How many sequences fall below eps within min(L_b, max_lag) lags."""
        return int((self.per_sequence >= 0).sum())

    def quantile(self, q: float) -> float:
        """h_(⌈qN⌉) of the sorted horizons, unreached ones last as ∞ (module docstring); q in [0, 1]."""
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 1:
            raise ValueError(f"q must be a number in [0, 1], got {q!r}")
        ordered = torch.where(self.per_sequence >= 0, self.per_sequence.double(), math.inf).sort().values
        return float(ordered[max(1, math.ceil(q * self.sequences)) - 1])

    @cached_property
    def histogram(self) -> Tensor:
        """counts[ℓ] = sequences whose horizon is ℓ, ℓ = 0..max_lag, (max_lag + 1,); the unreached ones are
        ``sequences − reached``."""
        return torch.bincount(self.per_sequence[self.per_sequence >= 0], minlength=self.max_lag + 1)

    def summary(self) -> dict[str, Any]:
        """Sequences, how many reach eps, and the quantiles of HORIZON_QUANTILES (∞ as None in JSON)."""
        return {"sequences": self.sequences, "reached": self.reached} | {
            name: self.quantile(q) for name, q in HORIZON_QUANTILES.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """eps, max_lag, the summary, the histogram and every sequence's horizon (−1: not reached)."""
        return {
            "recurrence": self.recurrence,
            "eps": self.eps,
            "max_lag": self.max_lag,
            "summary": {name: json_number(value) for name, value in self.summary().items()},
            "histogram": self.histogram.tolist(),
            "per_sequence": self.per_sequence.tolist(),
        }


@dataclass(frozen=True, eq=False)
class PooledLocalGradients:
    """Every valid step's local gradient ‖∂⁺h_k/∂θ‖_F per block, and ``"all"`` blocks together, pooled in data
    order (module docstring)."""

    recurrence: str
    values: dict[str, np.ndarray]  # block or "all" → (n,) in the model's dtype
    largest: dict[str, Any]  # the largest of a single block: block, step, sequence (in the data set), value

    @classmethod
    def of(cls, result: LocalGradients, first: int) -> PooledLocalGradients:
        """One batch's valid values; ``first``: the data set's index of the batch's first sequence."""
        named = {**result.norms, "all": result.total}
        values = {name: norms[~norms.isnan()].detach().cpu().numpy() for name, norms in named.items()}
        return cls(result.recurrence, values, result.largest | {"sequence": first + result.largest["sequence"]})

    @classmethod
    def pool(cls, parts: Sequence[PooledLocalGradients]) -> PooledLocalGradients:
        """Values concatenated in batch order; the largest one of all (ties to the lowest block, step and sequence,
        as one batch's argmax breaks them)."""
        first = parts[0]
        blocks = list(first.values)
        largest = min(
            (part.largest for part in parts),
            key=lambda top: (-top["value"], blocks.index(top["block"]), top["step"], top["sequence"]),
        )
        values = {name: np.concatenate([part.values[name] for part in parts]) for name in blocks}
        return cls(first.recurrence, values, largest)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per block and for "all": mean, median, p95 and max of the pooled values (LocalGradients.summary)."""
        return {name: finite_statistics(torch.from_numpy(values)) for name, values in self.values.items()}

    def to_dict(self) -> dict[str, Any]:
        """The summary, the largest value and how many steps were pooled (the values themselves are left out)."""
        steps = len(next(iter(self.values.values())))
        return {"recurrence": self.recurrence, "steps": steps, "summary": self.summary(), "largest": self.largest}


@dataclass(frozen=True, eq=False)
class PooledLyapunov:
    """Each sequence's Lyapunov exponents, in data order, with their means and standard errors over the sequences
    and over the batches (module docstring)."""

    recurrence: str
    exponents: Tensor  # (N, k) float64, −inf beyond a sequence's numerical rank
    rank: Tensor  # (N,)
    counted: Tensor  # (N,) steps averaged per sequence
    batch_edges: list[int]  # batch i holds the sequences batch_edges[i]..batch_edges[i + 1] − 1

    @classmethod
    def of(cls, result: Lyapunov) -> PooledLyapunov:
        """One batch's exponents."""
        exponents = result.exponents.detach().double().cpu()
        return cls(result.recurrence, exponents, result.rank.cpu(), result.counted.cpu(), [0, len(exponents)])

    @classmethod
    def pool(cls, parts: Sequence[PooledLyapunov]) -> PooledLyapunov:
        """Exponents concatenated in batch order; each part is one batch."""
        sizes = [len(part.exponents) for part in parts]
        edges = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        return cls(
            parts[0].recurrence,
            torch.cat([part.exponents for part in parts]),
            torch.cat([part.rank for part in parts]),
            torch.cat([part.counted for part in parts]),
            edges,
        )

    @cached_property
    def _over_sequences(self) -> tuple[Tensor, Tensor]:
        """(mean_j, sd_j / √n_j) over the sequences where λ_j is finite, (k,) each."""
        return _mean_and_stderr(self.exponents)

    @property
    def mean(self) -> Tensor:
        """mean_j over the sequences where λ_j is finite, (k,)."""
        return self._over_sequences[0]

    @property
    def stderr(self) -> Tensor:
        """sd_j / √n_j over the sequences where λ_j is finite, (k,); NaN with fewer than two."""
        return self._over_sequences[1]

    @cached_property
    def negative_infinite(self) -> Tensor:
        """Sequences whose λ_j is −inf (j beyond their numerical rank), (k,)."""
        return self.exponents.isneginf().sum(0)

    @cached_property
    def batch_means(self) -> Tensor:
        """μ_ij: the mean of the finite λ_j of batch i, (m, k); NaN where none is finite."""
        edges = self.batch_edges
        return torch.stack([_mean_and_stderr(self.exponents[a:b])[0] for a, b in zip(edges, edges[1:])])

    @cached_property
    def _over_batches(self) -> tuple[Tensor, Tensor]:
        """((1/m) Σ_i μ_ij, sd_i(μ_ij) / √m) over the batches with a finite μ_ij, (k,) each."""
        return _mean_and_stderr(self.batch_means)

    @property
    def batch_mean(self) -> Tensor:
        """(1/m) Σ_i μ_ij over the batches with a finite μ_ij, (k,)."""
        return self._over_batches[0]

    @property
    def batch_stderr(self) -> Tensor:
        """sd_i(μ_ij) / √m over those batches, (k,); NaN with fewer than two."""
        return self._over_batches[1]

    def to_dict(self) -> dict[str, Any]:
        """Means and standard errors over sequences and over batches, the −inf counts, and λ₁ (the first
        direction's exponent) and the rank of every sequence."""
        return {
            "recurrence": self.recurrence,
            "exponents_followed": self.exponents.shape[1],
            "sequences": {"mean": json_list(self.mean), "stderr": json_list(self.stderr)},
            "batches": {
                "count": len(self.batch_edges) - 1,
                "mean": json_list(self.batch_mean),
                "stderr": json_list(self.batch_stderr),
            },
            "negative_infinite": self.negative_infinite.tolist(),
            "largest_per_sequence": json_list(self.exponents[:, 0]),
            "rank": self.rank.tolist(),
            "counted": self.counted.tolist(),
        }


def _mean_and_stderr(values: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of values (n, k): the mean of its finite entries and sd / √count (sd with n − 1); NaN where
    there are none, and a NaN standard error with fewer than two."""
    finite = values.isfinite()
    count = finite.sum(0)
    mean = torch.where(finite, values, 0.0).sum(0) / count
    spread = torch.where(finite, values - mean, 0.0).square().sum(0) / (count - 1)
    return mean, torch.where(count >= 2, (spread / count).sqrt(), math.nan)


@dataclass(frozen=True, eq=False)
class DatasetRecurrence:
    """The pooled statistics of one recurrence (labelled as in :class:`~gatelens.analysis.pipeline.RecurrenceAnalyses`);
    a stage that was not run is None."""

    label: str
    layer: int | None
    direction: str | None
    regimes: PooledRegimes | None
    horizons: PooledHorizons | None
    local: PooledLocalGradients | None
    lyapunov: PooledLyapunov | None

    def to_dict(self) -> dict[str, Any]:
        results: dict[str, Any] = {"layer": self.layer, "direction": self.direction}
        for key, value in (("regimes", self.regimes), ("horizons", self.horizons),
                           ("local_gradients", self.local), ("lyapunov", self.lyapunov)):  # fmt: skip
            if value is not None:
                results[key] = value.to_dict()
        return results


@dataclass(frozen=True)
class BatchStatistics:
    """What one batch sends back: its statistics per recurrence, in pooled form, and its stages' seconds."""

    recurrences: list[DatasetRecurrence]
    seconds: dict[str, float]


def batch_statistics(
    model: Model,
    x: Any,
    lengths: Tensor | None,
    h0: InitialState,
    stages: tuple[str, ...],
    settings: Settings,
    first: int,
    device: str | None = None,
    progress: Listener | None = None,
) -> BatchStatistics:
    """Analyse one batch with :func:`gatelens.analyze` and keep what pools; ``first`` is the data set's index of its
    first sequence, ``device`` where to compute (None: the model's; h0 and lengths follow the model there). Runs
    here or on a Dask worker. Its seconds: the forward pass ("trace") and each stage's."""
    if device is not None:
        model = model.to(device)
    start = time.perf_counter()
    trace = model.trace(as_float_tensor(_in_memory(x), "x", model.dtype, model.device), h0, lengths=lengths)
    traced = time.perf_counter() - start
    analysis = analyze(trace, only=stages, settings=settings, progress=progress)
    return BatchStatistics(
        recurrences=[_pooled_part(analysis, part, first) for part in analysis.recurrences],
        seconds={"trace": traced, **analysis.seconds},
    )


def _pooled_part(analysis: Analysis, part: RecurrenceAnalyses, first: int) -> DatasetRecurrence:
    where = {"layer": part.layer, "direction": part.direction}
    return DatasetRecurrence(
        label=part.label,
        layer=part.layer,
        direction=part.direction,
        regimes=None if part.regimes is None else PooledRegimes.of(part.regimes),
        horizons=(
            None
            if part.propagation is None
            else PooledHorizons.of(analysis.trace, part.propagation, analysis.settings, **where)
        ),
        local=None if part.local is None else PooledLocalGradients.of(part.local, first),
        lyapunov=None if part.lyapunov is None else PooledLyapunov.of(part.lyapunov),
    )


def pool(batches: Sequence[BatchStatistics]) -> list[DatasetRecurrence]:
    """Every recurrence's statistics pooled over ``batches`` (in data order)."""
    pooled = []
    for index, part in enumerate(batches[0].recurrences):
        parts = [batch.recurrences[index] for batch in batches]

        def pooled_field(name: str, kind: Any) -> Any:
            return None if getattr(part, name) is None else kind.pool([getattr(p, name) for p in parts])

        pooled.append(
            DatasetRecurrence(
                label=part.label,
                layer=part.layer,
                direction=part.direction,
                regimes=pooled_field("regimes", PooledRegimes),
                horizons=pooled_field("horizons", PooledHorizons),
                local=pooled_field("local", PooledLocalGradients),
                lyapunov=pooled_field("lyapunov", PooledLyapunov),
            )
        )
    return pooled


# ---------------------------------------------------------------------------------------------------------------
# The data set's analysis.


@dataclass(frozen=True, eq=False)
class DatasetAnalysis:
    """What gatelens says about one model on a whole data set; build one with :func:`analyze_dataset`.

    ``batch_edges``: batch i holds sequences batch_edges[i]..batch_edges[i + 1] − 1; ``steps``: T of the input
    (padded); ``valid_steps``: Σ_b L_b; ``where``: where the batches ran, in words; ``seconds``: the forward passes
    ("trace") and each stage, summed over the batches (wherever they ran), and "wall": the whole call.
    """

    name: str
    model: str
    settings: Settings
    stages: tuple[str, ...]
    sequences: int
    batch_size: int
    batch_edges: list[int]
    steps: int
    valid_steps: int
    where: str
    recurrences: list[DatasetRecurrence]
    seconds: dict[str, float]

    @property
    def batches(self) -> int:
        return len(self.batch_edges) - 1

    @cached_property
    def explanation(self) -> Explanation:
        """The findings about the data set, in plain language, each with its number."""
        return dataset_explanation_of(self)

    def describe(self) -> str:
        """One line: how many sequences, in how many batches, where."""
        sizes = sorted({b - a for a, b in zip(self.batch_edges, self.batch_edges[1:])}, reverse=True)
        of = " or ".join(str(size) for size in sizes)
        batches = f"{self.batches} batch{'es' if self.batches != 1 else ''}"
        return (
            f"{self.sequences} sequences of up to {self.steps} steps ({self.valid_steps} valid steps) in {batches} of "
            f"{of}, on {self.where}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready results: the data set, the settings, the findings and each recurrence's pooled statistics."""
        return {
            "name": self.name,
            "model": self.model,
            "stages": list(self.stages),
            "settings": {"eps": self.settings.eps, "max_lag": self.settings.max_lag, "k": self.settings.k},
            "dataset": {
                "sequences": self.sequences,
                "batches": self.batches,
                "batch_size": self.batch_size,
                "batch_edges": self.batch_edges,
                "steps": self.steps,
                "valid_steps": self.valid_steps,
                "where": self.where,
            },
            "seconds": self.seconds,
            "explanation": self.explanation.to_dict(),
            "recurrences": {part.label: part.to_dict() for part in self.recurrences},
        }


def analyze_dataset(
    model: Model,
    x: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lengths: Any = None,
    h0: InitialState = None,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    settings: Settings | None = None,
    name: str = "model",
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    timeout: float = 10.0,
    progress: Listener | None = None,
) -> DatasetAnalysis:
    """Analyse N sequences in batches of at most ``batch_size`` and pool the statistics (module docstring).

    x: the N sequences in the model's layout, (T, N, I), or (N, T, I) for a batch-first model; a tensor of the
    model's dtype or a numpy array (a memory-mapped one is read batch by batch). lengths: (N,) for padded
    sequences; h0: as for :meth:`Model.trace`, with N sequences. only/skip: among DATASET_STAGES (default: all
    four). Where: ``client`` (a ``dask.distributed.Client``, left open), or ``scheduler`` (e.g.
    "tcp://host:8786", reached within ``timeout`` s), or ``workers`` local worker processes; none of them: here.
    ``progress(stage, done, total)`` hears "batches" after each batch and, when the batches run here, each stage
    of the current one.
    """
    started = time.perf_counter()
    if not isinstance(model, Model):
        raise TypeError(f"analyze_dataset needs a gatelens Model (gl.load(module)), got {type(model).__name__}")
    settings = Settings() if settings is None else settings
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a gl.Settings, got {type(settings).__name__}")
    stages = dataset_stages(only, skip)
    x, steps, sequences = _checked_input(model, x)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (sequences per batch), got {batch_size!r}")
    length = None if lengths is None else as_lengths(lengths, sequences, steps, torch.device("cpu"))
    _check_initial_batch(h0, sequences)
    distributed = client is not None or scheduler is not None or workers is not None
    if distributed:
        from gatelens.sweep.cluster import check_options  # Dask is imported only when asked for

        check_options(client, scheduler, workers, timeout)
    edges = list(range(0, sequences, int(batch_size))) + [sequences]
    batches = [_batch(model, x, length, h0, stages, settings, a, b) for a, b in zip(edges, edges[1:])]
    if distributed:
        results, where = _run_on_dask(model, batches, client, scheduler, workers, timeout, progress)
    else:
        results, where = _run_here(model, batches, progress), "this process"
    seconds = {stage: sum(result.seconds.get(stage, 0.0) for result in results) for stage in ("trace", *stages)}
    return DatasetAnalysis(
        name=name,
        model=repr(model),
        settings=settings,
        stages=stages,
        sequences=sequences,
        batch_size=int(batch_size),
        batch_edges=edges,
        steps=steps,
        valid_steps=steps * sequences if length is None else int(length.sum()),
        where=where,
        recurrences=pool(results),
        seconds=seconds | {"wall": time.perf_counter() - started},
    )


def dataset_stages(only: Iterable[str] | None, skip: Iterable[str]) -> tuple[str, ...]:
    """The stages to run on every batch: ``only`` (default: DATASET_STAGES) minus ``skip``, in STAGES order."""
    chosen = chosen_stages(DATASET_STAGES if only is None else only, skip)
    per_batch = [stage for stage in STAGES if stage in chosen and stage not in DATASET_STAGES]
    if per_batch:
        raise ValueError(
            f"{' and '.join(per_batch)} cannot be pooled over batches (their results are one batch's maps and "
            f"events); analyze_dataset runs {', '.join(DATASET_STAGES)}: use gl.analyze on one batch for "
            f"{' and '.join(per_batch)}"
        )
    return tuple(stage for stage in STAGES if stage in chosen)


def _checked_input(model: Model, x: Any) -> tuple[Any, int, int]:
    """x (unchanged: batches are converted one at a time), T and N; the first sequence is converted and checked
    as a whole batch would be, so a wrong dtype or kind is refused before any batch runs."""
    layout = "(N, T, I)" if model.batch_first else "(T, N, I)"
    if not isinstance(x, (Tensor, np.ndarray)):
        raise TypeError(f"x must be a torch.Tensor or a numpy array {layout}, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(
            f"x must hold N sequences as {layout} (a model's batch_first decides), got shape {tuple(x.shape)}"
        )
    sequences, steps = (x.shape[0], x.shape[1]) if model.batch_first else (x.shape[1], x.shape[0])
    if x.shape[-1] != model.input_size:
        raise ValueError(f"x has {x.shape[-1]} input features, expected {model.input_size} ({layout})")
    if sequences == 0 or steps == 0:
        raise ValueError(f"x must have at least one step and one sequence, got shape {tuple(x.shape)}")
    as_float_tensor(_in_memory(_sequences(model, x, 0, 1)), "x", model.dtype, torch.device("cpu"))
    return x, steps, sequences


def _in_memory(x: Any) -> Any:
    """A read-only array (a batch of a memory-mapped file) copied into memory: torch wants memory it may write."""
    return np.array(x) if isinstance(x, np.ndarray) and not x.flags.writeable else x


def _sequences(model: Model, x: Any, first: int, stop: int, steps: int | None = None) -> Any:
    """Sequences first..stop − 1 of x, in the model's layout, their first ``steps`` steps (None: all)."""
    return x[first:stop, :steps] if model.batch_first else x[:steps, first:stop]


def _check_initial_batch(h0: InitialState, sequences: int) -> None:
    """h0's batch axis must hold the N sequences (the rest is checked by Model.trace on each batch)."""
    if h0 is None:
        return
    if isinstance(h0, Mapping):
        parts, axis = {f"h0[{name!r}]": state for name, state in h0.items()}, 0
    elif isinstance(h0, tuple):
        parts, axis = dict(zip(("h0", "c0"), h0)), 1
    else:
        parts, axis = {"h0": h0}, 1
    for label, part in parts.items():
        if not isinstance(part, Tensor):
            raise TypeError(f"{label} must be a tensor (analyze_dataset slices it by batch), got {type(part).__name__}")
        if part.dim() <= axis or part.shape[axis] != sequences:
            raise ValueError(
                f"{label} has shape {tuple(part.shape)}; its axis {axis} must hold the N = {sequences} sequences of x"
            )


def _initial_batch(h0: InitialState, first: int, stop: int) -> InitialState:
    if h0 is None:
        return None
    if isinstance(h0, Mapping):
        return {name: state[first:stop] for name, state in h0.items()}
    if isinstance(h0, tuple):
        return tuple(part[:, first:stop] for part in h0)
    return h0[:, first:stop]


@dataclass(frozen=True)
class _Batch:
    """One batch's arguments of :func:`batch_statistics`."""

    first: int
    stop: int
    x: Any
    lengths: Tensor | None
    h0: InitialState
    stages: tuple[str, ...]
    settings: Settings

    def arguments(self) -> tuple[Any, ...]:
        """x, lengths, h0, stages, settings and first, as :func:`batch_statistics` takes them after the model."""
        return self.x, self.lengths, self.h0, self.stages, self.settings, self.first


def _batch(model: Model, x: Any, lengths: Tensor | None, h0: InitialState, stages: tuple[str, ...],
           settings: Settings, first: int, stop: int) -> _Batch:  # fmt: skip
    """Sequences first..stop − 1, cut to the batch's longest sequence (later steps are padding of every one)."""
    own = None if lengths is None else lengths[first:stop]
    steps = None if own is None else int(own.max())
    return _Batch(first, stop, _sequences(model, x, first, stop, steps), own, _initial_batch(h0, first, stop),
                  stages, settings)  # fmt: skip


def _in_context(batch: _Batch, error: Exception) -> Exception:
    """A bad-input error of one batch, naming the batch's sequences (its own message counts them from 0)."""
    if type(error) in (ValueError, TypeError):
        return type(error)(f"sequences {batch.first}..{batch.stop - 1} of the data set (batch indices from 0): {error}")
    return error


def _run_here(model: Model, batches: list[_Batch], progress: Listener | None) -> list[BatchStatistics]:
    results = []
    for done, batch in enumerate(batches):
        if progress is not None:
            progress("batches", done, len(batches))
        try:
            results.append(batch_statistics(model, *batch.arguments(), progress=progress))
        except (ValueError, TypeError) as error:
            raise _in_context(batch, error) from error
    if progress is not None:
        progress("batches", len(batches), len(batches))
    return results


def _run_on_dask(
    model: Model,
    batches: list[_Batch],
    client: Any,
    scheduler: str | None,
    workers: int | None,
    timeout: float,
    progress: Listener | None,
) -> tuple[list[BatchStatistics], str]:
    """Run every batch on the cluster (at most IN_FLIGHT_PER_THREAD per worker thread at a time); their results in
    batch order, and where they ran, in words."""
    from distributed import as_completed

    from gatelens.sweep.cluster import connect

    device = str(model.device)
    results: dict[int, BatchStatistics] = {}
    with connect(client, scheduler, workers, timeout, len(batches)) as active:
        info = active.scheduler_info()["workers"]
        threads = max(1, sum(worker.get("nthreads", 1) for worker in info.values()))
        where = _cluster_words(client, scheduler, len(info))
        remote_model = active.scatter(model.to("cpu"), broadcast=True, hash=False)  # sent once, to every worker
        token = uuid.uuid4().hex[:8]
        waiting = iter(enumerate(batches))
        running: dict[str, int] = {}  # task key → batch index

        def submit() -> Any:
            index, batch = next(waiting, (-1, None))
            if batch is None:
                return None
            key = f"gatelens-dataset-{token}-{index}"
            running[key] = index
            arguments = _own(batch.arguments())
            return active.submit(batch_statistics, remote_model, *arguments, device, key=key, pure=False, retries=0)

        first = [future for future in (submit() for _ in range(IN_FLIGHT_PER_THREAD * threads)) if future is not None]
        finished = as_completed(first, loop=active.loop)
        futures = {future.key: future for future in first}
        if progress is not None:
            progress("batches", 0, len(batches))
        try:
            for future in finished:
                index = running.pop(future.key)
                futures.pop(future.key)
                try:
                    results[index] = future.result()
                except (ValueError, TypeError) as error:
                    raise _in_context(batches[index], error) from error
                future.release()
                following = submit()
                if following is not None:
                    futures[following.key] = following
                    finished.add(following)
                if progress is not None:
                    progress("batches", len(results), len(batches))
        except BaseException:  # an error or an interrupt: nothing of ours keeps running on the cluster
            active.cancel(list(futures.values()))
            raise
    return [results[index] for index in range(len(batches))], where


def _own(value: Any) -> Any:
    """``value`` with every tensor and array copied (in tuples and dicts too): a worker is sent its own slice, since
    a pickled tensor view carries its whole storage (every batch would carry the whole data set)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return np.array(value)  # a copy in memory, also of a memory-mapped file
    if isinstance(value, tuple):
        return tuple(_own(part) for part in value)
    if isinstance(value, Mapping):
        return {name: _own(part) for name, part in value.items()}
    return value


def _cluster_words(client: Any, scheduler: str | None, count: int) -> str:
    """Where the batches ran, in words."""
    plural = f"{count} worker{'s' if count != 1 else ''}"
    if client is not None:
        return f"the Dask client's cluster ({plural})"
    if scheduler is not None:
        return f"the Dask scheduler at {scheduler.strip()} ({plural})"
    return f"a local Dask cluster of {plural}"
