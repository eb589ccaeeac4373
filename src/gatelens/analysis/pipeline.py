"""Every analysis of one model on one batch, each computed once: what explain, the report, results.json and the
command line read.

:func:`analyze` takes a :class:`~gatelens.Trace` (or a model and its inputs) and runs the chosen stages:

    credit        the credit map of the task's loss when it is given, else of a probe loss L = ⟨w, y⟩ (many-to-one,
                  "last": h_n, as ``gl.credit(loss="last")`` reads it; many-to-many, "all": every step): its total,
                  lag profile and path shares; and, for the loss step × source step map, the pair norms ‖C(t, k)‖
                  of at most ``heatmap_rows`` loss steps, evenly spaced (of the many-to-many probe when the chosen
                  loss sits at fewer than half the steps)
    per recurrence (the whole unidirectional model, or each layer and direction of a bidirectional one):
      regimes       gate regimes and unit timescales τ = 1 / (1 − c̄)
      propagation   log‖∂h_T/∂h_{T−ℓ}‖₂ and ‖·‖_F from the last step, lag by lag until every sequence is below
                    eps (the gradient horizon is then known for all of them) or ``max_lag`` lags past the longest
                    padding
      local         ‖∂⁺h_k/∂θ‖_F per step and weight block
      lyapunov      the top k Lyapunov exponents (default 8)
    blocking      steps whose Jacobian rows collapse, and what survives of each gradient around them, under the
                  task's loss or both probe losses

``Analysis.explanation`` turns the results into findings (:mod:`gatelens.analysis.explain`). Without a task loss
the probe's readout w is drawn from ``seed`` (:func:`gatelens.probe_credits`): where credit comes from does not
depend on it, only the magnitudes do.

Cost, for T steps, B sequences and state size S: the trace and every stage but credit's pair norms are linear in T
and B; propagation is O(lags · B · S³) (products of explicit S × S matrices) and stops at the horizon; Lyapunov
O(T · B · S · k) and local gradients O(T · B · S) for the built-in cells (plus the feed's O(T · B · S²) in a stack);
the pair norms O(rows · T · B · S²). Memory: O(T · B · S) besides the results, which are O(T · B) per block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from gatelens.analysis.blocking import Blocking, blocking, probe_credits
from gatelens.analysis.credit import CreditMap
from gatelens.analysis.explain import Explanation, explanation_of
from gatelens.analysis.local import LocalGradients, local_gradients
from gatelens.analysis.lyapunov import DEFAULT_EXPONENTS, Lyapunov, lyapunov, traced
from gatelens.analysis.norms import flushes_subnormals
from gatelens.analysis.propagation import Propagation, propagation
from gatelens.analysis.regimes import Regimes, check_thresholds, regimes
from gatelens.analysis.serialize import json_list
from gatelens.model import InitialState, Model
from gatelens.progress import listening
from gatelens.trace import DIRECTIONS, Trace

STAGES = ("credit", "regimes", "propagation", "local", "lyapunov", "blocking")
PROBES = {"last": "many-to-one", "all": "many-to-many"}  # --loss → the probe loss it stands for
MAX_LAG = 256  # lags of propagation past the longest padding, unless every sequence falls below eps sooner
HEATMAP_ROWS = 64  # loss steps of the loss step × source step map

Listener = Callable[[str, float, float], None]  # (stage, done, total)


@dataclass(frozen=True)
class Settings:
    """What the analyses were asked for: eps of the horizon, the lag cap, exponents followed, regime thresholds,
    the blocking tolerance, the probe seed and the rows of the pair-norm map."""

    eps: float = 1e-3
    max_lag: int = MAX_LAG
    k: int = DEFAULT_EXPONENTS
    thresholds: float | tuple[float, float] = (0.1, 0.9)
    tol: float = 0.1
    seed: int = 0
    heatmap_rows: int = HEATMAP_ROWS

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(
                f"eps must be a number in (0, 1) (a norm below which the flow counts as gone), got {self.eps!r}"
            )
        for name in ("max_lag", "k", "heatmap_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_thresholds(self.thresholds)


@dataclass(frozen=True)
class RecurrenceAnalyses:
    """The analyses of one recurrence, ``label`` as the findings name it ("stack", "l0", "l0_reverse", …); a stage
    that was not run is None."""

    label: str
    layer: int | None
    direction: str | None
    regimes: Regimes | None
    propagation: Propagation | None
    local: LocalGradients | None
    lyapunov: Lyapunov | None

    def to_dict(self, eps: float) -> dict[str, Any]:
        results: dict[str, Any] = {"layer": self.layer, "direction": self.direction}
        if self.regimes is not None:
            results["regimes"] = self.regimes.to_dict()
        if self.propagation is not None:
            horizon = self.propagation.horizon(eps).tolist()
            results["propagation"] = self.propagation.to_dict() | {"eps": eps, "horizon": horizon}
        if self.local is not None:
            results["local_gradients"] = self.local.to_dict()
        if self.lyapunov is not None:
            results["lyapunov"] = self.lyapunov.to_dict()
        return results


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything gatelens says about one model on one batch; build one with :func:`analyze`."""

    name: str
    trace: Trace
    settings: Settings
    stages: tuple[str, ...]
    loss: str  # what the credit map is of, in words
    credit: CreditMap | None
    credit_rows: CreditMap | None  # the loss step × source step map, at most settings.heatmap_rows loss steps
    credit_rows_probe: bool  # whether that map is of the many-to-many probe (the chosen loss has few loss steps)
    blocking: Blocking | None
    recurrences: list[RecurrenceAnalyses]
    seconds: dict[str, float]  # wall time of each stage run (over every recurrence)

    @cached_property
    def explanation(self) -> Explanation:
        """The findings, in plain language, each with its number (one per stage that was run)."""
        return explanation_of(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready results; the credit map keeps its total, lag profile and path shares (the T × T maps are in
        ``gatelens credit``'s .npz)."""
        results: dict[str, Any] = {
            "name": self.name,
            "model": repr(self.trace.model),
            "stages": list(self.stages),
            "settings": {"eps": self.settings.eps, "max_lag": self.settings.max_lag, "k": self.settings.k},
            "loss": self.loss,
            "explanation": self.explanation.to_dict(),
        }
        if self.credit is not None:
            results["credit"] = {
                field: {name: json_list(value) for name, value in getattr(self.credit, field).items()}
                for field in ("total", "by_lag", "path_shares")
            }
        results["recurrences"] = {part.label: part.to_dict(self.settings.eps) for part in self.recurrences}
        return results


@flushes_subnormals
def analyze(
    source: Trace | Model,
    x: Any = None,
    *,
    h0: InitialState = None,
    lengths: Any = None,
    credit_map: CreditMap | Mapping[str, CreditMap] | None = None,
    loss: str = "last",
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    settings: Settings | None = None,
    name: str = "model",
    progress: Listener | None = None,
) -> Analysis:
    """Run the chosen stages (module docstring) on a trace, or on ``model.trace(x, h0, lengths=lengths)``.

    credit_map: the credit map of the task's loss (or several by name, for blocking; the first is the one shown);
    without it, the probe loss ``loss`` ("last" or "all"). only/skip: stage names from STAGES. ``progress(stage,
    done, total)`` hears how far each stage has got.
    """
    trace = traced(source, x, h0, lengths, "analyze")
    settings = Settings() if settings is None else settings
    chosen = chosen_stages(only, skip)
    maps = _credit_maps(trace, credit_map, loss, settings.seed)
    described = (
        "the task's loss"
        if credit_map is not None
        else (f"probe loss {PROBES[loss]}: ⟨w, h⟩ with a random readout w (seed {settings.seed})")
    )
    shown = maps[next(iter(maps))] if credit_map is not None else maps[PROBES[loss]]

    seconds: dict[str, float] = {}

    def run(stage: str, work: Callable[[], Any]) -> Any:
        if stage not in chosen:
            return None
        start = time.perf_counter()
        if progress is None:
            result = work()
        else:
            progress(stage, 0, 1)
            with listening(lambda done, total: progress(stage, done, total)):
                result = work()
            progress(stage, 1, 1)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        return result

    def many_to_many() -> CreditMap:
        return maps["many-to-many"] if credit_map is None else probe_credits(trace, seed=settings.seed)["many-to-many"]

    credit_results = run("credit", lambda: _credit_results(shown, many_to_many, settings.heatmap_rows))
    heatmap, heatmap_probe = credit_results if credit_results is not None else (None, False)
    parts = []
    for layer, direction in recurrence_parts(trace):
        where = {"layer": layer, "direction": direction}
        label = trace.recurrence(layer, direction).name
        parts.append(
            RecurrenceAnalyses(
                label=label,
                layer=layer,
                direction=direction,
                regimes=run("regimes", lambda: regimes(trace, settings.thresholds, **where)),
                propagation=run("propagation", lambda: horizon_propagation(trace, settings, **where)),
                local=run("local", lambda: local_gradients(trace, **where)),
                lyapunov=run("lyapunov", lambda: _lyapunov(trace, settings.k, **where)),
            )
        )
    found = run("blocking", lambda: blocking(trace, maps, tol=settings.tol, seed=settings.seed))
    return Analysis(
        name=name,
        trace=trace,
        settings=settings,
        stages=tuple(stage for stage in STAGES if stage in chosen),
        loss=described,
        credit=shown if "credit" in chosen else None,
        credit_rows=heatmap,
        credit_rows_probe=heatmap_probe,
        blocking=found,
        recurrences=parts,
        seconds=seconds,
    )


def explain(
    trace: Trace,
    credit: CreditMap | Mapping[str, CreditMap] | None = None,
    *,
    thresholds: float | tuple[float, float] = (0.1, 0.9),
    eps: float = 1e-3,
    tol: float = 0.1,
    seed: int = 0,
    max_lag: int = MAX_LAG,
    k: int = DEFAULT_EXPONENTS,
) -> Explanation:
    """The findings about ``trace`` (:mod:`gatelens.analysis.explain`): :func:`analyze` without the credit stage.

    ``credit``: the credit map(s) of the user's loss, used for the blocking findings; default: the many-to-one and
    many-to-many probe losses drawn from ``seed``."""
    if not isinstance(trace, Trace):
        raise TypeError(f"explain needs a Trace (from model.trace(x)), got {type(trace).__name__}")
    settings = Settings(eps=eps, max_lag=max_lag, k=k, thresholds=thresholds, tol=tol, seed=seed)
    return analyze(trace, credit_map=credit, skip=("credit",), settings=settings).explanation


def chosen_stages(only: Iterable[str] | None, skip: Iterable[str]) -> set[str]:
    """The stages to run: ``only`` (default: all) minus ``skip``, each checked against STAGES."""
    named = {"only": list(only) if only is not None else list(STAGES), "skip": list(skip)}
    for option, stages in named.items():
        unknown = sorted(set(stages) - set(STAGES))
        if isinstance(only if option == "only" else skip, str) or unknown:
            raise ValueError(f"{option} must list stages among {', '.join(STAGES)}; got {stages!r}")
    chosen = set(named["only"]) - set(named["skip"])
    if not chosen:
        raise ValueError(f"no stage left to run (only={named['only']}, skip={named['skip']})")
    return chosen


def recurrence_parts(trace: Trace) -> list[tuple[int | None, str | None]]:
    """The recurrences analysed: the whole unidirectional model, or each layer and direction."""
    model = trace.model
    if not model.bidirectional:
        return [(None, None)]
    return [(layer, direction) for layer in range(model.num_layers) for direction in DIRECTIONS]


def horizon_propagation(
    trace: Trace, settings: Settings, *, layer: int | None = None, direction: str | None = None
) -> Propagation:
    """Propagation from the last step, σ₁ only, until every sequence is below eps or ``max_lag`` lags past the
    longest padding (steps past a sequence's end are identity lags from the last step)."""
    rec = trace.recurrence(layer, direction)
    padding = 0 if trace.lengths is None else int(rec.steps - int(trace.lengths.min()))
    return propagation(
        trace,
        layer=layer,
        direction=direction,
        max_lag=min(rec.steps, padding + settings.max_lag),
        singular_values="largest",
        stop_below=settings.eps,
    )


def heatmap_credit(shown: CreditMap, probe: Callable[[], CreditMap], rows: int) -> tuple[CreditMap, bool]:
    """The map whose pair norms the loss step × source step figure shows, and whether it is the probe: the shown
    loss, or the many-to-many probe ``probe()`` when the shown loss sits at fewer than half the steps; restricted
    to at most ``rows`` loss steps, evenly spaced among its loss steps (rows t of ‖C(t, k)‖ depend on g_t alone, so
    they are exact)."""
    source, is_probe = shown, False
    if 2 * len(_loss_steps(shown)) < len(shown.out_grads):
        source, is_probe = probe(), True
    loss_steps = _loss_steps(source)
    if len(loss_steps) > rows:
        source = source.at_loss_steps(loss_steps[torch.linspace(0, len(loss_steps) - 1, rows).round().long()])
    return source, is_probe


def _loss_steps(credit_map: CreditMap) -> torch.Tensor:
    """The steps at which the map's loss has a gradient."""
    return torch.nonzero(credit_map.out_grads.flatten(1).ne(0).any(dim=1)).flatten()


def _credit_results(shown: CreditMap, probe: Callable[[], CreditMap], rows: int) -> tuple[CreditMap, bool]:
    """Compute the shown map's total, lag profile and path shares, and the heatmap's pair norms; return the
    heatmap's map and whether it is the probe's."""
    for field in ("total", "by_lag", "path_shares"):
        getattr(shown, field)
    heatmap, is_probe = heatmap_credit(shown, probe, rows)
    heatmap.norm_rows  # noqa: B018 - computed here, inside the stage's progress
    return heatmap, is_probe


def _credit_maps(
    trace: Trace, given: CreditMap | Mapping[str, CreditMap] | None, loss: str, seed: int
) -> dict[str, CreditMap]:
    """The task's credit map(s) by name, or both probe maps."""
    if given is None:
        if loss not in PROBES:
            raise ValueError(f"unknown loss {loss!r}; expected 'last' (many-to-one) or 'all' (many-to-many)")
        return probe_credits(trace, seed=seed)
    maps = {"loss": given} if isinstance(given, CreditMap) else dict(given) if isinstance(given, Mapping) else None
    if not maps or not all(isinstance(cm, CreditMap) for cm in maps.values()):
        raise TypeError(f"credit must be a CreditMap (from gl.credit) or a non-empty dict of them, got {given!r:.80}")
    if any(cm.trace is not trace for cm in maps.values()):
        raise ValueError("every credit map must be computed from this trace (gl.credit(trace, …))")
    return maps


def _lyapunov(trace: Trace, k: int, *, layer: int | None, direction: str | None) -> Lyapunov:
    size = trace.recurrence(layer, direction).cell.state_size
    return lyapunov(trace, k=min(size, k), layer=layer, direction=direction)
