"""Training the experiments' models: a recurrent layer and a linear head, fitted with Adam and early stopping.

Shapes: T steps, N sequences, I input features, H hidden units, O outputs; time-major (T, N, ·) throughout (a
batch-first :class:`~gatelens.experiments.Dataset` is turned time-major on the way in). The model is

    h_t = RNN(h_{t−1}, x_t)   (GRU, Elman tanh or LSTM; ``num_layers`` stacked; h_0 = 0)      ŷ_t = W h_t + b

with the head applied at every step. The loss counts the last step (loss_steps "last") or every step t > w
(loss_steps "all", w = ``washout``: the first w steps, while the state settles, are left out of loss and metrics):

    regression      L = mean over the counted steps, sequences and outputs of (ŷ − y)²            (MSE)
    classification  L = mean over the counted steps and sequences of −log softmax(ŷ)[class]     (cross-entropy)

Modes (Ljung's output error vs equation error):

    simulation  the model reads x_t = u_t only, so ŷ is a free-run simulation; any dataset
    one-step    simulators only (regression targets at every step): the model reads x_t = [u_t, y_{t−1}], the input
                followed by the *measured* output of the step before, so its input size is I + O. y_0 = 0 (a
                window cut from inside a record has no true y_0: one more reason for a washout). It is
                trained on the one-step-ahead error (teacher forcing) and also evaluated in free run, where its
                own prediction is fed back: x_t = [u_t, ŷ_{t−1}], ŷ_0 = 0, step by step with the head in the loop

Metrics per split: "loss" (L above, the criterion trained on); regression: "rmse" = √MSE of the free-run
prediction over the counted steps (the simulation error, comparable across modes), and in one-step mode
"rmse_one_step" (√L) and "rmse_free_run" (= "rmse"); classification: "accuracy", the share of counted
(step, sequence) pairs whose arg max ŷ is the target class.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress, TextColumn
from torch import Tensor, nn

from gatelens._validation import check_finite
from gatelens.analysis.serialize import json_number
from gatelens.experiments.tasks import PARTS, Dataset, _count, _flag, _real

KINDS = ("gru", "elman", "lstm")
MODES = ("simulation", "one-step")
_RECURRENT = {"gru": nn.GRU, "elman": nn.RNN, "lstm": nn.LSTM}

Callback = Callable[..., Any]  # called as callback(step=int, module=SequenceModel, loss=float)


class SequenceModel(nn.Module):
    """A recurrent layer (``.rnn``: nn.GRU, nn.RNN with tanh, or nn.LSTM; time-major) and a linear head
    (``.head``) applied at every step: forward(x (T, N, I)) → ŷ (T, N, O). ``gatelens.load(model.rnn)`` reads the
    recurrent layer. Built with PyTorch's default initialisation from the global RNG; :func:`build_model` seeds it.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int, output_size: int, *, num_layers: int = 1) -> None:
        super().__init__()
        kind = _check_kind(kind)
        input_size, hidden_size = _count(input_size, "input_size"), _count(hidden_size, "hidden_size")
        output_size, num_layers = _count(output_size, "output_size"), _count(num_layers, "num_layers")
        self.kind = kind
        self.rnn = _RECURRENT[kind](input_size, hidden_size, num_layers=num_layers)
        self.head = nn.Linear(hidden_size, output_size)

    def forward(self, x: Tensor) -> Tensor:
        hidden, _ = self.rnn(x)  # (T, N, H)
        return self.head(hidden)  # (T, N, O)


@dataclass(frozen=True)
class EpochStats:
    """One epoch of :func:`train`: ``train_loss`` is the mean of its mini-batch losses weighted by batch size (the
    weights change during the epoch), ``validation_loss`` the loss on the validation split after it, and the
    gradient norm ‖∇L‖₂ over all parameters, before clipping, averaged and maximised over its optimiser steps."""

    epoch: int
    train_loss: float
    validation_loss: float
    gradient_norm_mean: float
    gradient_norm_max: float

    def to_dict(self) -> dict[str, Any]:
        """The numbers for JSON (NaN or infinity become None)."""
        return {key: value if isinstance(value, int) else json_number(value) for key, value in asdict(self).items()}


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What :func:`train` did and found.

    ``best_epoch`` is the epoch with the lowest validation loss, whose weights the model holds on return; 0 means
    no epoch improved on the initial weights, which were restored. ``stopped_early``: training ended before
    ``epochs`` (patience ran out, or the validation loss was NaN or infinite). ``steps``: optimiser steps taken.
    ``metrics[split]`` (split "train", "validation", "test") are those of :func:`evaluate` with the best weights.
    ``settings``: the hyperparameters as passed.
    """

    history: tuple[EpochStats, ...]
    best_epoch: int
    initial_validation_loss: float
    stopped_early: bool
    steps: int
    metrics: dict[str, dict[str, float]]
    settings: dict[str, Any]

    @property
    def best_validation_loss(self) -> float:
        """The validation loss of the weights the model holds: at ``best_epoch``, or the initial one if 0."""
        return self.history[self.best_epoch - 1].validation_loss if self.best_epoch else self.initial_validation_loss

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON values (NaN or infinity become None)."""
        return {
            "history": [epoch.to_dict() for epoch in self.history],
            "best_epoch": self.best_epoch,
            "best_validation_loss": json_number(self.best_validation_loss),
            "initial_validation_loss": json_number(self.initial_validation_loss),
            "stopped_early": self.stopped_early,
            "steps": self.steps,
            "metrics": {
                split: {name: json_number(value) for name, value in values.items()}
                for split, values in self.metrics.items()
            },
            "settings": dict(self.settings),
        }


@dataclass(frozen=True)
class _Data:
    """One split, checked against the model: time-major, on the model's device. ``u`` (T, N, I); ``y`` (T, N, O) or
    (T, N) class indices for ``per_step``, else (N, O) or (N,)."""

    u: Tensor
    y: Tensor
    per_step: bool
    classes: bool

    @property
    def sequences(self) -> int:
        return self.u.shape[1]

    def batch(self, index: Tensor) -> _Data:
        """The sequences at ``index``."""
        y = self.y[:, index] if self.per_step else self.y[index]
        return _Data(self.u[:, index], y, self.per_step, self.classes)


def build_model(
    kind: str,
    input_size: int,
    hidden_size: int,
    output_size: int,
    *,
    num_layers: int = 1,
    chrono: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SequenceModel:
    """A :class:`SequenceModel` initialised reproducibly from ``seed`` (PyTorch's default initialisation, drawn
    from a forked RNG: the global RNG state is left as it was), in ``dtype``.

    ``chrono=T_max`` applies chrono initialisation (Tallec & Ollivier 2018) in every layer, so that the carry gates'
    timescales 1/(1 − σ(b)) = 1 + U spread over [2, T_max], with U ~ U[1, T_max − 1] drawn per unit:

        LSTM (gates i, f, g, o)         b_if = log U,  b_ii = −b_if,  b_hf = b_hi = 0
        GRU  (h' = z h + (1 − z) n:     b_iz = log U,  b_hz = 0
              PyTorch's z is the keep gate)

    The other biases and all weights keep their default initialisation. An Elman RNN has no gates to set.
    """
    kind = _check_kind(kind)
    seed = _count(seed, "seed", 0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.float64, …), got {dtype!r}")
    if chrono is not None:
        if kind == "elman":
            raise ValueError("chrono initialisation sets gate biases, and an Elman RNN (kind='elman') has no gates")
        chrono = _real(chrono, "chrono (T_max, the longest timescale in steps)", 2.0, strict=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SequenceModel(kind, input_size, hidden_size, output_size, num_layers=num_layers)
        if chrono is not None:
            _chrono(model.rnn, chrono)
    return model.to(dtype)


def _chrono(rnn: nn.GRU | nn.LSTM, longest: float) -> None:
    """Chrono biases (see :func:`build_model`), drawn from the global RNG (forked by the caller)."""
    size = rnn.hidden_size
    carry, write = slice(size, 2 * size), slice(0, size)  # LSTM f and i; GRU z (its "write" is 1 − z)
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{layer}"), getattr(rnn, f"bias_hh_l{layer}")
            b_carry = torch.empty(size, dtype=b_ih.dtype).uniform_(1.0, longest - 1.0).log_()
            b_ih[carry], b_hh[carry] = b_carry, 0.0
            if isinstance(rnn, nn.LSTM):
                b_ih[write], b_hh[write] = -b_carry, 0.0


def train(
    model: SequenceModel,
    data: Mapping[str, Dataset],
    *,
    epochs: int = 100,
    batch_size: int = 32,
    lr: float = 1e-3,
    clip: float | None = None,
    patience: int = 10,
    mode: str = "simulation",
    washout: int = 0,
    callbacks: Iterable[Callback] = (),
    seed: int = 0,
    progress: bool | Console = False,
) -> TrainResult:
    """Fit ``model`` in place with Adam on ``data["train"]``, stopping early on ``data["validation"]``.

    data: {"train", "validation", "test"} → Dataset, as :meth:`Dataset.split` returns (cut simulations into
    :meth:`Dataset.windows` first, and pass a ``washout``). Each epoch shuffles the training sequences with a
    torch.Generator seeded by ``seed`` and takes one Adam step (learning rate ``lr``) per mini-batch of
    ``batch_size`` sequences (the last may be smaller). In mode "one-step" the model reads [u_t, y_{t−1}] and so
    has I + O inputs (module docstring). With ``clip``, the gradient is rescaled to norm ≤ ``clip``
    (torch.nn.utils.clip_grad_norm_); the norm recorded in the history is the one before clipping.

    Each step, after backward and clipping and before ``optimizer.step()`` (so the module still has the weights
    the gradient was taken at, and ``.grad`` holds the gradient, clipped if ``clip`` is set), every callback is
    called as ``callback(step=s, module=model, loss=L)``: s = 0, 1, … counts the optimiser steps before this one,
    L is the mini-batch loss. After each epoch the validation loss is computed; when it has not fallen below its
    best (the initial weights count as epoch 0) for ``patience`` epochs in a row, or is NaN or infinite, training
    stops. On return the model holds the best weights and no gradients. ``progress=True`` shows a rich progress
    bar (on ``progress`` itself when it is a rich Console); otherwise nothing is printed.
    """
    _check_model(model)
    mode, washout = _check_mode(mode), _count(washout, "washout", 0)
    epochs, batch_size = _count(epochs, "epochs"), _count(batch_size, "batch_size")
    patience = _count(patience, "patience")
    lr = _real(lr, "lr", 0.0, strict=True)
    clip = None if clip is None else _real(clip, "clip", 0.0, strict=True)
    seed = _count(seed, "seed", 0)
    if not isinstance(progress, Console):
        _flag(progress, "progress")
    callbacks = _check_callbacks(callbacks)
    splits = _check_splits(data)
    prepared = {part: _prepare(model, dataset, mode, washout, f"data[{part!r}]") for part, dataset in splits.items()}
    settings = {
        "mode": mode, "washout": washout, "epochs": epochs, "batch_size": batch_size, "lr": lr, "clip": clip,
        "patience": patience, "seed": seed,
    }  # fmt: skip

    training, validation = prepared["train"], prepared["validation"]
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    best_loss = initial_loss = _validation_loss(model, validation, mode, washout)
    best_epoch, best_weights, stale, step = 0, _copy_weights(model), 0, 0
    history: list[EpochStats] = []
    console = progress if isinstance(progress, Console) else None
    columns = (*Progress.get_default_columns(), TextColumn("{task.fields[losses]}"))
    bar = Progress(*columns, console=console, disable=progress is False)
    with bar:
        task = bar.add_task("training", total=epochs, losses="")
        for epoch in range(1, epochs + 1):
            order = torch.randperm(training.sequences, generator=generator).to(training.u.device)
            loss_sum, norms = 0.0, []
            for start in range(0, training.sequences, batch_size):
                batch = training.batch(order[start : start + batch_size])
                optimizer.zero_grad(set_to_none=True)
                loss = _loss(_forward(model, batch.u, batch.y, mode), batch, washout)
                loss.backward()
                norms.append(_gradient_norm(parameters, clip))
                value = float(loss.detach())
                for callback in callbacks:
                    callback(step=step, module=model, loss=value)
                optimizer.step()
                loss_sum += value * batch.sequences
                step += 1
            validation_loss = _validation_loss(model, validation, mode, washout)
            history.append(
                EpochStats(epoch, loss_sum / training.sequences, validation_loss, sum(norms) / len(norms), max(norms))
            )
            bar.update(task, advance=1, losses=f"train {history[-1].train_loss:.4g}  validation {validation_loss:.4g}")
            if validation_loss < best_loss:
                best_loss, best_epoch, best_weights, stale = validation_loss, epoch, _copy_weights(model), 0
            else:
                stale += 1
            if stale >= patience or not math.isfinite(validation_loss):
                bar.update(task, total=epoch, description="stopped early")  # a full bar: nothing is left to run
                break
    optimizer.zero_grad(set_to_none=True)
    model.load_state_dict(best_weights)
    return TrainResult(
        history=tuple(history),
        best_epoch=best_epoch,
        initial_validation_loss=initial_loss,
        stopped_early=len(history) < epochs,
        steps=step,
        metrics={part: _metrics(model, split, mode, washout) for part, split in prepared.items()},
        settings=settings,
    )


def evaluate(model: SequenceModel, dataset: Dataset, *, mode: str = "simulation", washout: int = 0) -> dict[str, float]:
    """The metrics of ``model`` on ``dataset`` (module docstring): "loss", and "rmse" (with "rmse_one_step" and
    "rmse_free_run" in one-step mode) or "accuracy". No gradients are recorded."""
    _check_model(model)
    mode, washout = _check_mode(mode), _count(washout, "washout", 0)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a Dataset, got {type(dataset).__name__}")
    return _metrics(model, _prepare(model, dataset, mode, washout, "dataset"), mode, washout)


def predict(model: SequenceModel, inputs: Tensor, *, mode: str = "simulation", targets: Tensor | None = None) -> Tensor:
    """ŷ (T, N, O) for ``inputs`` u (T, N, I), under the caller's grad mode.

    mode "simulation": model(u); ``targets`` are not read and must be None. Mode "one-step" (the model has
    I + O inputs): with ``targets`` y (T, N, O), the one-step-ahead prediction from x_t = [u_t, y_{t−1}], y_0 = 0;
    without, the free run x_t = [u_t, ŷ_{t−1}], ŷ_0 = 0, one step at a time.
    """
    _check_model(model)
    mode = _check_mode(mode)
    dtype, outputs = _dtype(model), model.head.out_features
    features = model.rnn.input_size - (outputs if mode == "one-step" else 0)
    _check_tensor(inputs, "inputs", dtype, "(T, N, I)", (None, None, features))
    if mode == "simulation" and targets is not None:
        raise ValueError("targets are read only in mode='one-step'; a simulation reads the inputs alone")
    if targets is not None:
        _check_tensor(targets, "targets", dtype, "(T, N, O)", (*inputs.shape[:2], outputs))
    return _forward(model, inputs, targets, mode)


def _forward(model: SequenceModel, u: Tensor, y: Tensor | None, mode: str) -> Tensor:
    """ŷ (T, N, O): model(u) in simulation mode; in one-step mode teacher-forced by y, or the free run if y is None."""
    if mode == "simulation":
        return model(u)
    if y is None:
        return _free_run(model, u)
    previous = torch.cat([torch.zeros_like(y[:1]), y[:-1]])  # y_{t−1}, with y_0 = 0
    return model(torch.cat([u, previous], dim=-1))


def _free_run(model: SequenceModel, u: Tensor) -> Tensor:
    """x_t = [u_t, ŷ_{t−1}], ŷ_0 = 0: one step of the recurrent layer and the head at a time."""
    predicted = u.new_zeros(u.shape[1], model.head.out_features)  # ŷ_0 (N, O)
    state, outputs = None, []
    for u_t in u:
        hidden, state = model.rnn(torch.cat([u_t, predicted], dim=-1)[None], state)  # (1, N, H)
        predicted = model.head(hidden[0])
        outputs.append(predicted)
    return torch.stack(outputs)


def _counted(outputs: Tensor, data: _Data, washout: int) -> tuple[Tensor, Tensor]:
    """Predictions and targets at the steps that count: t > washout for per-step targets, else the last step."""
    return (outputs[washout:], data.y[washout:]) if data.per_step else (outputs[-1], data.y)


def _loss(outputs: Tensor, data: _Data, washout: int) -> Tensor:
    predicted, target = _counted(outputs, data, washout)
    if data.classes:
        return F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1))
    return F.mse_loss(predicted, target)


def _validation_loss(model: SequenceModel, data: _Data, mode: str, washout: int) -> float:
    with torch.no_grad():
        return float(_loss(_forward(model, data.u, data.y, mode), data, washout))


def _metrics(model: SequenceModel, data: _Data, mode: str, washout: int) -> dict[str, float]:
    with torch.no_grad():
        outputs = _forward(model, data.u, data.y, mode)
        metrics = {"loss": float(_loss(outputs, data, washout))}
        if data.classes:
            predicted, target = _counted(outputs, data, washout)
            return metrics | {"accuracy": float((predicted.argmax(-1) == target).double().mean())}
        if mode == "simulation":
            return metrics | {"rmse": math.sqrt(metrics["loss"])}
        free_run = math.sqrt(float(_loss(_free_run(model, data.u), data, washout)))
        return metrics | {"rmse": free_run, "rmse_one_step": math.sqrt(metrics["loss"]), "rmse_free_run": free_run}


def _gradient_norm(parameters: list[nn.Parameter], clip: float | None) -> float:
    """‖∇L‖₂ over all parameters before clipping; rescales the gradient to norm ≤ clip if clip is set."""
    if clip is not None:
        return float(nn.utils.clip_grad_norm_(parameters, clip))
    return float(nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None]))


def _copy_weights(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _dtype(model: SequenceModel) -> torch.dtype:
    return model.head.weight.dtype


def _check_kind(kind: Any) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def _check_model(model: Any) -> None:
    if not isinstance(model, SequenceModel):
        raise TypeError(f"model must be a SequenceModel (from build_model), got {type(model).__name__}")


def _check_callbacks(callbacks: Any) -> tuple[Callback, ...]:
    if callable(callbacks) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a sequence of callables (use (callback,) for one), got {callbacks!r:.80}")
    callbacks = tuple(callbacks)
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"each callback must be callable as callback(step=, module=, loss=), got {callback!r:.80}")
    return callbacks


def _check_splits(data: Any) -> dict[str, Dataset]:
    """The three splits, each a Dataset, all of one task (same loss steps, classes and sizes)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a dict {{'train', 'validation', 'test'}} → Dataset, got {type(data).__name__}")
    missing, unexpected = [part for part in PARTS if part not in data], [key for key in data if key not in PARTS]
    if missing or unexpected:
        raise ValueError(
            f"data must have exactly the splits {', '.join(map(repr, PARTS))} (as Dataset.split returns); "
            f"missing {missing}, unexpected {unexpected}"
        )
    for part in PARTS:
        if not isinstance(data[part], Dataset):
            raise TypeError(f"data[{part!r}] must be a Dataset, got {type(data[part]).__name__}")
    first = data["train"]
    for part in PARTS[1:]:
        dataset = data[part]
        given, expected = _signature(dataset), _signature(first)
        if given != expected:
            raise ValueError(
                f"data[{part!r}] is not the same task as data['train']: (loss_steps, categories, input_size, "
                f"output_size) {given} vs {expected}"
            )
    return {part: data[part] for part in PARTS}


def _signature(dataset: Dataset) -> tuple[Any, ...]:
    return dataset.loss_steps, dataset.categories, dataset.input_size, dataset.output_size


def _prepare(model: SequenceModel, dataset: Dataset, mode: str, washout: int, name: str) -> _Data:
    """``dataset`` checked against the model, mode and washout, time-major on the model's device."""
    classes, per_step = dataset.categories is not None, dataset.loss_steps == "all"
    if mode == "one-step" and (classes or not per_step):
        kind = "class targets" if classes else "one target per sequence (loss_steps='last')"
        raise ValueError(
            f"mode='one-step' feeds back the measured output of the previous step, so it needs regression targets "
            f"at every step; {name} ({dataset.name}) has {kind}"
        )
    features = dataset.input_size + (dataset.output_size if mode == "one-step" else 0)
    if model.rnn.input_size != features or model.head.out_features != dataset.output_size:
        layout = f"I + O = {dataset.input_size} + {dataset.output_size}" if mode == "one-step" else "I"
        raise ValueError(
            f"model has {model.rnn.input_size} inputs and {model.head.out_features} outputs, but {name} in "
            f"mode={mode!r} needs {features} inputs ({layout}) and {dataset.output_size} outputs"
            + (" (one per class)" if classes else "")
        )
    if dataset.inputs.dtype != _dtype(model):
        raise TypeError(
            f"{name} has dtype {dataset.inputs.dtype} but the model is {_dtype(model)}; build the model with "
            f"dtype={dataset.inputs.dtype} or generate the data with dtype={_dtype(model)}"
        )
    if washout and not per_step:
        raise ValueError(f"washout is for targets at every step; {name} has one target per sequence, got {washout}")
    if washout >= dataset.steps:
        raise ValueError(f"washout must be less than the number of steps of {name} ({dataset.steps}), got {washout}")
    check_finite(dataset.inputs, f"{name}.inputs")
    if not classes:
        check_finite(dataset.targets, f"{name}.targets")
    u, y = dataset.inputs, dataset.targets
    if dataset.batch_first:
        u, y = u.transpose(0, 1), (y.transpose(0, 1) if per_step else y)
    device = model.head.weight.device
    return _Data(u.to(device), y.to(device), per_step, classes)


def _check_tensor(value: Any, name: str, dtype: torch.dtype, layout: str, shape: tuple[int | None, ...]) -> None:
    """A 3-D tensor of ``dtype`` whose sizes equal ``shape`` where it gives one."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        given = f"a tensor of dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point tensor {layout}, got {given}")
    if value.dtype != dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but the model is {dtype}")
    if value.ndim != len(shape) or any(want is not None and size != want for size, want in zip(value.shape, shape)):
        expected = ", ".join("·" if size is None else str(size) for size in shape)
        raise ValueError(f"{name} must have shape {layout} = ({expected}), got {tuple(value.shape)}")
