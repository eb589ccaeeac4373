"""A training callback that watches the gradient flow of a recurrent network while it learns.

Every ``every`` steps, :class:`Monitor` traces a fixed probe batch through a copy of the network's recurrent part
(``gl.load``: the weights are copied, so the module, its gradients and its train/eval mode stay as they are) and
records one row:

    step, loss                the training step and the loss the loop passed in
    gradient_norm             √(Σ_p ‖∂L/∂p‖_F²) over the module's parameters that hold a gradient (as they are when
                              the callback runs: after clipping, if the loop clips first)
    horizon                   the upper median over probe sequences of the first lag ℓ at which
                              ‖∂h_L/∂h_(L−ℓ)‖₂ < eps, from each sequence's own last step L (propagation); a sequence
                              where it never falls below eps counts as its length L (T without lengths)
    horizon_reached_share     the share of probe sequences where it does fall below eps
    carry, blocked, elman,    the regime census: shares of all unit-steps in each gate regime (regimes)
    mixed
    largest_local_gradient    max over steps, sequences and blocks of ‖∂⁺h_k/∂θ‖_F (local_gradients)
    lyapunov                  the upper median over sequences of the top Lyapunov exponent λ₁ (lyapunov, k=1)
    horizon_collapsed         horizon < collapse × the first recorded horizon
    local_exploded            largest_local_gradient > explode × the first recorded one

The analyses read one recurrence: the whole stack of a unidirectional network, and layer 0's forward direction of a
bidirectional one. They see the deterministic forward pass (no dropout), in float64 for a float64 module and in
float32 otherwise. The upper median (the middle value, the higher of the two middle ones for an even count) is the
one :func:`gatelens.explain` reports.

When a flag first turns true, :class:`MonitorWarning` says so once per monitor and kind; the flags keep marking
every later row where the condition holds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gatelens.analysis import local_gradients, lyapunov, regimes
from gatelens.analysis.pipeline import Settings, horizon_propagation
from gatelens.analysis.regimes import REGIMES
from gatelens.analysis.serialize import json_number
from gatelens.experiments.folders import writable_folder
from gatelens.io import load
from gatelens.model import Model

COLUMNS = (
    "step",
    "loss",
    "gradient_norm",
    "horizon",
    "horizon_reached_share",
    *REGIMES,
    "largest_local_gradient",
    "lyapunov",
    "horizon_collapsed",
    "local_exploded",
)
RECURRENT = (nn.RNNBase, nn.RNNCellBase)  # what gl.load reads from a module
DROPOUT_NOTICE = r".* is in training mode with dropout=.*"  # gl.load's notice; the module docstring says it


class MonitorWarning(UserWarning):
    """The gradient horizon collapsed or a local gradient exploded during training."""


class Monitor:
    """A callback ``monitor(step, module, loss=None)`` for any PyTorch training loop (module docstring).

    probe: a fixed floating-point batch, laid out as the recurrent module takes it ((T, B, I), (B, T, I) for a
        batch_first module, or unbatched (T, I)); copied at construction. lengths: its sequences' true lengths
        (checked with the probe at the first call).
    every: record at the steps divisible by ``every``. eps: the norm in (0, 1) that defines the horizon.
    recurrent: where the recurrent part is: None (the module itself if it is an nn.GRU, nn.LSTM, nn.RNN or one of
        their Cell versions, else its single such submodule), a submodule name such as "rnn" (dotted names reach
        deeper), or a callable module → recurrent module.
    collapse: in (0, 1), explode: > 1: the ratios to the first recorded horizon and largest local gradient that
        set the flags and warn.
    out: a directory (created) that receives monitor.csv (one line per record, appended) and monitor.json (all
        records, rewritten after each); a new monitor replaces the files of an earlier one there.
    tensorboard: also log every number as a scalar ``gatelens/<column>`` to a SummaryWriter in ``out``, when
        ``out`` is given and the ``tensorboard`` package is installed; without it this is skipped quietly.
    """

    def __init__(
        self,
        probe: Tensor,
        *,
        every: int = 10,
        out: str | os.PathLike[str] | None = None,
        lengths: Any = None,
        eps: float = 1e-3,
        recurrent: str | Callable[[nn.Module], nn.Module] | None = None,
        collapse: float = 0.5,
        explode: float = 10.0,
        tensorboard: bool = True,
    ) -> None:
        self.probe = _check_probe(probe)
        self.lengths = lengths
        if isinstance(every, (bool, np.bool_)) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an int ≥ 1 (record every that many steps), got {every!r}")
        self.every = int(every)
        self.eps = _ratio("eps", eps, 0.0, 1.0, "a norm below which the gradient counts as gone")
        self.collapse = _ratio("collapse", collapse, 0.0, 1.0, "a fraction of the first recorded horizon")
        self.explode = _ratio("explode", explode, 1.0, math.inf, "a multiple of the first largest local gradient")
        if isinstance(recurrent, nn.Module) or not (
            recurrent is None or isinstance(recurrent, str) or callable(recurrent)
        ):
            raise TypeError(
                f"recurrent must be None, a submodule name such as 'rnn', or a callable module → recurrent module "
                f"(e.g. lambda m: m.encoder.rnn), got {type(recurrent).__name__}"
            )
        self.recurrent = recurrent
        if not isinstance(tensorboard, bool):
            raise TypeError(f"tensorboard must be True or False, got {tensorboard!r}")
        self.out = None if out is None else writable_folder(out)
        self.records: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        self._writer = _summary_writer(self.out) if tensorboard and self.out is not None else None

    def __call__(self, step: int, module: nn.Module, loss: float | Tensor | None = None) -> dict[str, Any] | None:
        """Record a row (module docstring) when ``step`` is divisible by ``every`` and return it; else None."""
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an int ≥ 0 (the training step), got {step!r}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if step % self.every:
            return None
        row = {"step": int(step), "loss": _loss(loss), "gradient_norm": gradient_norm(module)}
        with torch.no_grad():  # the copies hold no graph; this keeps any future analysis from building one
            row |= self._analyses(self._model(module))
        first = self.records[0] if self.records else row
        row["horizon_collapsed"] = row["horizon"] < self.collapse * first["horizon"]
        row["local_exploded"] = row["largest_local_gradient"] > self.explode * first["largest_local_gradient"]
        self.records.append(row)
        self._warn(row, first)
        self._write(row)
        return row

    def to_dict(self) -> list[dict[str, Any]]:
        """The records, ready for JSON: every NaN or ±inf (a diverged loss, λ₁ = −inf) becomes None."""
        return [{key: _json_value(value) for key, value in row.items()} for row in self.records]

    def close(self) -> None:
        """Close the TensorBoard writer, if there is one (the CSV and JSON files are closed after each record)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -----------------------------------------------------------------------------------------------------------

    def _model(self, module: nn.Module) -> Model:
        """A gatelens copy of the recurrent part, in float64 if the module is, else float32."""
        if self.recurrent is None:
            part = module
            if not isinstance(part, RECURRENT):
                found = [(name, m) for name, m in module.named_modules() if isinstance(m, RECURRENT)]
                if len(found) != 1:
                    listed = ", ".join(f"{name} ({type(m).__name__})" for name, m in found) or "none"
                    raise TypeError(
                        f"Monitor needs one recurrent layer (nn.GRU, nn.LSTM, nn.RNN or a Cell version) in the "
                        f"{type(module).__name__}; found {len(found)}: {listed}. Pass recurrent= a submodule name or "
                        f"a callable module → recurrent module"
                    )
                part = found[0][1]
        elif isinstance(self.recurrent, str):
            try:
                part = module.get_submodule(self.recurrent)
            except AttributeError:
                children = ", ".join(name for name, _ in module.named_children()) or "none"
                raise ValueError(
                    f"recurrent={self.recurrent!r}: the {type(module).__name__} has no such submodule "
                    f"(its children: {children})"
                ) from None
        else:
            part = self.recurrent(module)
        if not isinstance(part, RECURRENT):
            raise TypeError(
                f"recurrent={self.recurrent!r} gives a {type(part).__name__}, expected an nn.GRU, nn.LSTM, nn.RNN "
                f"or a Cell version"
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=DROPOUT_NOTICE, category=UserWarning)  # no dropout: docstring
            model = load(part)
        return model if model.dtype in (torch.float32, torch.float64) else model.to(torch.float32)

    def _analyses(self, model: Model) -> dict[str, Any]:
        """horizon, horizon_reached_share, the census, largest_local_gradient and lyapunov on the probe."""
        trace = model.trace(self.probe.to(dtype=model.dtype, device=model.device), lengths=self.lengths)
        part = {"layer": 0, "direction": "forward"} if model.bidirectional else {}
        rec = trace.recurrence(**part)
        steps, batch = rec.input_index.shape
        lengths = torch.full((batch,), steps) if trace.lengths is None else trace.lengths.cpu()
        # Steps past a sequence's end are identities: from the last step T, the first T − L lags of a sequence of
        # length L are identity lags, so its own horizon is the one from T minus T − L (as gl.explain computes it).
        from_end = horizon_propagation(trace, Settings(eps=self.eps, max_lag=steps), **part).horizon(self.eps)[0].cpu()
        reached = from_end >= 0
        horizons = torch.where(reached, from_end - (steps - lengths), lengths)
        census = regimes(trace, **part).census.tolist()
        exponents = lyapunov(trace, k=1, **part).largest.tolist()
        return {
            "horizon": _upper_median(horizons.tolist()),
            "horizon_reached_share": float(reached.double().mean()),
            **dict(zip(REGIMES, census)),
            "largest_local_gradient": local_gradients(trace, **part).largest["value"],
            "lyapunov": _upper_median(exponents),
        }

    def _warn(self, row: dict[str, Any], first: dict[str, Any]) -> None:
        """One MonitorWarning per kind and monitor, when its flag first turns true."""
        messages = {
            "horizon_collapsed": (
                f"step {row['step']}: the gradient horizon collapsed to {row['horizon']} steps, below "
                f"{self.collapse:g} × the {first['horizon']} steps first recorded at step {first['step']}"
            ),
            "local_exploded": (
                f"step {row['step']}: the largest local gradient grew to {row['largest_local_gradient']:.3g}, "
                f"more than {self.explode:g} × the {first['largest_local_gradient']:.3g} first recorded at step "
                f"{first['step']}"
            ),
        }
        for flag, message in messages.items():
            if row[flag] and flag not in self._warned:
                self._warned.add(flag)
                note = f" (the row's {flag} flag marks it; this warning is not repeated)"
                warnings.warn(message + note, MonitorWarning, stacklevel=3)

    def _write(self, row: dict[str, Any]) -> None:
        """Append the row to monitor.csv (header with the first), rewrite monitor.json, log to TensorBoard."""
        if self.out is None:
            return
        first = len(self.records) == 1
        with open(self.out / "monitor.csv", "w" if first else "a", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            if first:
                writer.writerow(COLUMNS)
            writer.writerow(["" if row[key] is None else row[key] for key in COLUMNS])
        # Written beside the target and renamed over it, so an interrupted run never leaves half a JSON file.
        temporary = self.out / "monitor.json.tmp"
        temporary.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False), encoding="utf-8")
        os.replace(temporary, self.out / "monitor.json")
        if self._writer is not None:
            for key in COLUMNS[1:]:
                if row[key] is not None:
                    self._writer.add_scalar(f"gatelens/{key}", float(row[key]), global_step=row["step"])
            self._writer.flush()


def gradient_norm(module: nn.Module) -> float | None:
    """√(Σ_p ‖p.grad‖_F²) over the module's parameters that hold a gradient, in float64; None if none does."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64).cpu() for g in grads])
    return float(torch.linalg.vector_norm(norms))


def _check_probe(probe: Any) -> Tensor:
    """The probe, checked (a finite floating-point 2-D or 3-D tensor with at least one step) and copied."""
    if not isinstance(probe, Tensor):
        raise TypeError(f"probe must be a torch.Tensor (the input batch to analyse), got {type(probe).__name__}")
    if not probe.is_floating_point():
        raise TypeError(f"probe must be a floating-point tensor, got dtype {probe.dtype}")
    if probe.dim() not in (2, 3) or probe.numel() == 0:
        raise ValueError(
            f"probe must be a non-empty 3-D batch (T, B, I) ((B, T, I) for a batch_first module) or an unbatched "
            f"(T, I), got shape {tuple(probe.shape)}"
        )
    if not bool(torch.isfinite(probe).all()):
        raise ValueError("probe contains NaN or Inf")
    return probe.detach().clone()


def _ratio(name: str, value: Any, low: float, high: float, meaning: str) -> float:
    """A real number strictly between low and high (high may be inf)."""
    bounds = f"({low:g}, {high:g})" if math.isfinite(high) else f"> {low:g}"
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, float, np.number))
        or not low < value < high
        or not math.isfinite(value)
    ):
        raise ValueError(
            f"{name} must be a number {'in ' if math.isfinite(high) else ''}{bounds} ({meaning}), got {value!r}"
        )
    return float(value)


def _summary_writer(folder: Path) -> Any:
    """A TensorBoard SummaryWriter in ``folder``, or None when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def _loss(loss: Any) -> float | None:
    """The loss as a float: a number or a one-element tensor (detached), or None."""
    if loss is None:
        return None
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return float(loss.detach())
    if isinstance(loss, (bool, np.bool_)) or not isinstance(loss, (int, float, np.number)):
        raise TypeError(f"loss must be a number or a one-element tensor, got {type(loss).__name__}")
    return float(loss)


def _upper_median(values: list[Any]) -> Any:
    """The middle value; of the two middle ones, the higher (so one singular sequence, λ₁ = −inf, cannot decide)."""
    return sorted(values)[len(values) // 2]


def _json_value(value: Any) -> Any:
    """None for NaN and ±inf floats; everything else as it is."""
    return json_number(value) if isinstance(value, float) else value
