"""The trainer against hand computations and constructed cases.

Models: shapes, seeded reproducibility that leaves the global RNG alone, chrono biases by their formulas, and
``gatelens.load(model.rnn)`` reproducing the torch layer. Training: it learns a first-order system; the adding and
copy tasks run with their own losses; the loss it reports equals MSE / cross-entropy written out here, at the weights
the callback sees; clipping bounds the gradient the callback sees; early stopping restores the best weights
(constructed by a callback that spoils the weights from a chosen epoch on); same seed, same history. One-step mode:
the free run equals a loop that re-runs the model on the growing prefix of its own fed-back predictions, the
one-step prediction reads the measured outputs. Then callbacks, printing, JSON and bad input.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

import gatelens as gl
from gatelens.experiments.tasks import adding_problem, copy_task, first_order_system, multi_timescale
from gatelens.experiments.train import (
    KINDS,
    EpochStats,
    SequenceModel,
    TrainResult,
    build_model,
    evaluate,
    predict,
    train,
)

F64 = torch.float64
BATCH = 8
STEPS_PER_EPOCH = 4  # 28 training windows in batches of 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny, so every op is latency-bound: a second intra-op thread only adds waiting, and on a
    busy machine it made this file ten times slower. The setting is restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _first_order(seed: int = 0, **options):
    """First-order system, 4 records of 400 steps cut along time, then into 40-step windows: 28 / 8 / 8 sequences."""
    parts = first_order_system(400, 4, seed, **options).split()
    return {part: dataset.windows(40) for part, dataset in parts.items()}


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _mse(outputs: Tensor, targets: Tensor, washout: int) -> float:
    """Σ over steps t ≥ washout (0-based), sequences and outputs of (ŷ − y)², divided by their count."""
    outputs, total, count = outputs.detach(), 0.0, 0
    for t in range(washout, outputs.shape[0]):
        for n in range(outputs.shape[1]):
            for o in range(outputs.shape[2]):
                total += (float(outputs[t, n, o]) - float(targets[t, n, o])) ** 2
                count += 1
    return total / count


def _cross_entropy(logits: Tensor, classes: Tensor) -> float:
    """Mean over (step, sequence) of log Σ_c exp(ŷ_c) − ŷ_class."""
    logits = logits.detach()
    terms = [
        math.log(sum(math.exp(float(value)) for value in logits[t, n])) - float(logits[t, n, int(classes[t, n])])
        for t in range(classes.shape[0])
        for n in range(classes.shape[1])
    ]
    return sum(terms) / len(terms)


# ---------------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", KINDS)
def test_build_model_shapes_and_layers(kind):
    model = build_model(kind, 3, 5, 2, num_layers=2, dtype=F64)
    expected = {"gru": nn.GRU, "elman": nn.RNN, "lstm": nn.LSTM}[kind]
    assert type(model.rnn) is expected and model.rnn.num_layers == 2 and not model.rnn.batch_first
    assert isinstance(model.head, nn.Linear) and (model.head.in_features, model.head.out_features) == (5, 2)
    if kind == "elman":
        assert model.rnn.nonlinearity == "tanh"
    x = torch.randn(7, 4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = model(x)
    assert out.shape == (7, 4, 2) and out.dtype == F64
    hidden, _ = model.rnn(x)
    torch.testing.assert_close(out, hidden @ model.head.weight.T + model.head.bias, rtol=0, atol=1e-14)


@pytest.mark.parametrize("chrono", [None, 30])
def test_build_model_is_reproducible_and_leaves_the_global_rng_alone(chrono):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = build_model("lstm", 2, 6, 1, num_layers=2, chrono=chrono, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    again = build_model("lstm", 2, 6, 1, num_layers=2, chrono=chrono, seed=3)
    other = build_model("lstm", 2, 6, 1, num_layers=2, chrono=chrono, seed=4)
    assert _same_weights(_weights(first), _weights(again))
    assert not any(torch.equal(value, _weights(other)[name]) for name, value in _weights(first).items())
    assert all(value.dtype == torch.float32 for value in first.state_dict().values())


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_chrono_biases_follow_the_formulas(kind):
    hidden, longest = 64, 50.0
    plain = _weights(build_model(kind, 2, hidden, 1, num_layers=2, seed=5))
    model = build_model(kind, 2, hidden, 1, num_layers=2, chrono=longest, seed=5)
    weights = _weights(model)
    carry, write = slice(hidden, 2 * hidden), slice(0, hidden)  # LSTM f / i, GRU z / r (PyTorch's gate order)
    draws = []
    for layer in range(2):
        b_ih, b_hh = weights[f"rnn.bias_ih_l{layer}"], weights[f"rnn.bias_hh_l{layer}"]
        u = b_ih[carry].exp()  # U ~ U[1, T_max − 1]
        assert bool(((u >= 1 - 1e-5) & (u <= longest - 1 + 1e-4)).all())
        assert torch.equal(b_hh[carry], torch.zeros(hidden))
        if kind == "lstm":  # b_ii = −b_if, b_hi = 0; g and o keep their default values
            assert torch.equal(b_ih[write], -b_ih[carry]) and torch.equal(b_hh[write], torch.zeros(hidden))
            untouched = slice(2 * hidden, 4 * hidden)
        else:  # b_ir, b_in, b_hr, b_hn keep their default values
            untouched = [*range(hidden), *range(2 * hidden, 3 * hidden)]
        for name, bias in ((f"rnn.bias_ih_l{layer}", b_ih), (f"rnn.bias_hh_l{layer}", b_hh)):
            assert torch.equal(bias[untouched], plain[name][untouched])
        draws.append(u)
        # timescales 1 / (1 − σ(b)) = 1 + U spread over [2, T_max]
        timescale = 1 / (1 - torch.sigmoid(b_ih[carry].double()))
        torch.testing.assert_close(timescale, 1 + u.double(), rtol=1e-5, atol=0)
        assert float(timescale.min()) < 2 + 0.2 * (longest - 2) and float(timescale.max()) > 2 + 0.8 * (longest - 2)
    assert not torch.equal(draws[0], draws[1])  # each layer draws its own
    assert abs(float(torch.cat(draws).mean()) - longest / 2) < 5  # the mean of U[1, 49], ± 4 standard errors
    for name, value in weights.items():
        if "bias" not in name:
            assert torch.equal(value, plain[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_gatelens_load_reproduces_the_recurrent_layer(kind):
    model = build_model(kind, 3, 5, 2, num_layers=2, chrono=None if kind == "elman" else 20, dtype=F64)
    x = torch.randn(9, 4, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected, _ = model.rnn(x)
    torch.testing.assert_close(gl.load(model.rnn).trace(x).output, expected, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("seed", [0, 1])
def test_train_learns_a_first_order_system(seed):
    parts = _first_order(seed)
    model = build_model("gru", 1, 8, 1, seed=seed)
    result = train(model, parts, epochs=6, batch_size=BATCH, lr=1e-2, washout=5, seed=seed)
    assert isinstance(result, TrainResult) and len(result.history) == 6 and result.steps == 6 * STEPS_PER_EPOCH
    assert result.best_validation_loss < 0.25 * result.initial_validation_loss
    assert result.best_validation_loss == min(epoch.validation_loss for epoch in result.history)
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss
    for part, metrics in result.metrics.items():
        assert set(metrics) == {"loss", "rmse"}, part
        assert metrics["rmse"] == pytest.approx(math.sqrt(metrics["loss"]), rel=1e-12)
    assert result.metrics["validation"]["loss"] == pytest.approx(result.best_validation_loss, rel=1e-6)


def test_adding_problem_trains_on_the_last_step():
    parts = adding_problem(8, 60, 0).split()
    result = train(build_model("lstm", 2, 6, 1), parts, epochs=3, batch_size=16, lr=1e-2)
    assert len(result.history) == 3 and result.steps == 3 * math.ceil(42 / 16)
    for metrics in result.metrics.values():
        assert set(metrics) == {"loss", "rmse"} and all(math.isfinite(value) for value in metrics.values())
    assert all(math.isfinite(epoch.gradient_norm_max) and epoch.gradient_norm_max > 0 for epoch in result.history)


def test_copy_task_uses_cross_entropy_and_reports_accuracy():
    parts = copy_task(3, 60, 0, symbols=3, length=2).split()
    model = build_model("gru", 5, 8, 5)
    result = train(model, parts, epochs=4, batch_size=16, lr=1e-2)
    assert result.best_validation_loss < result.initial_validation_loss
    test = parts["test"]
    logits = model(test.inputs).detach()
    metrics = result.metrics["test"]
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(_cross_entropy(logits, test.targets), rel=1e-5)
    assert metrics["accuracy"] == (logits.argmax(-1) == test.targets).sum().item() / test.targets.numel()
    assert evaluate(model, test) == metrics


@pytest.mark.parametrize(
    ("name", "washout"), [("first_order_system", 0), ("first_order_system", 7), ("adding_problem", 0), ("copy", 2)]
)
def test_reported_losses_equal_a_hand_computation(name, washout):
    """One batch per epoch: each callback's loss is the loss of the whole training split at the weights the module
    holds during the callback (so before the optimiser step), written out here."""
    if name == "first_order_system":
        parts, model = _first_order(), build_model("elman", 1, 4, 1)
    elif name == "adding_problem":
        parts, model = adding_problem(6, 30, 1).split(), build_model("gru", 2, 4, 1)
    else:
        parts, model = copy_task(2, 30, 1, symbols=3, length=2).split(), build_model("lstm", 5, 4, 5)

    def hand(data):
        outputs = model(data.inputs)
        if name == "adding_problem":  # the last step only
            return _mse(outputs[-1:], data.targets[None], 0)
        if name == "copy":
            return _cross_entropy(outputs[washout:], data.targets[washout:])
        return _mse(outputs, data.targets, washout)

    initial = {part: hand(data) for part, data in parts.items()}
    seen = []

    def check(*, step, module, loss):
        with torch.no_grad():
            seen.append((loss, hand(parts["train"])))

    result = train(model, parts, epochs=3, batch_size=100, lr=1e-2, washout=washout, patience=5, callbacks=(check,))
    assert len(seen) == 3
    for loss, expected in seen:
        assert loss == pytest.approx(expected, rel=1e-5)
    assert result.history[0].train_loss == seen[0][0]
    assert result.initial_validation_loss == pytest.approx(initial["validation"], rel=1e-5)
    with torch.no_grad():
        for part, data in parts.items():
            assert result.metrics[part]["loss"] == pytest.approx(hand(data), rel=1e-5)


def test_clipping_bounds_the_gradient_and_the_history_keeps_the_norm_before_it():
    parts, clip = _first_order(), 1e-3
    norms = []

    def record(*, step, module, loss):
        norms.append(math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in module.parameters())))

    clipped = train(build_model("gru", 1, 8, 1), parts, epochs=2, batch_size=BATCH, clip=clip, callbacks=(record,))
    assert len(norms) == 2 * STEPS_PER_EPOCH
    assert max(norms) <= clip * (1 + 1e-5)
    assert min(epoch.gradient_norm_mean for epoch in clipped.history) > 10 * clip  # clipping was active

    norms.clear()
    free = train(build_model("gru", 1, 8, 1), parts, epochs=2, batch_size=BATCH, callbacks=(record,))
    for index, epoch in enumerate(free.history):
        steps = norms[index * STEPS_PER_EPOCH : (index + 1) * STEPS_PER_EPOCH]
        assert epoch.gradient_norm_mean == pytest.approx(sum(steps) / len(steps), rel=1e-5)
        assert epoch.gradient_norm_max == pytest.approx(max(steps), rel=1e-5)
    # one full-batch step at the same weights records the same norm, clipped or not
    single = [
        train(build_model("gru", 1, 8, 1), parts, epochs=1, batch_size=100, clip=c).history[0] for c in (clip, None)
    ]
    assert single[0].gradient_norm_max == pytest.approx(single[1].gradient_norm_max, rel=1e-6)
    assert single[0].gradient_norm_max > 10 * clip


# ---------------------------------------------------------------------------------------------- early stopping


def _spoil_from_epoch(epoch: int, saved: dict, *, value: float | None = None):
    """A callback that, from the first step of ``epoch`` on, spoils the head's weights (scaled by −3, or set to
    ``value``); at that first step it saves the weights the previous epoch ended with."""
    first = (epoch - 1) * STEPS_PER_EPOCH

    def spoil(*, step, module, loss):
        if step == first:
            saved.update(_weights(module))
        if step >= first:
            with torch.no_grad():
                module.head.weight.mul_(-3.0) if value is None else module.head.weight.fill_(value)

    return spoil


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_restores_the_best_weights(patience):
    parts, saved = _first_order(), {}
    model = build_model("gru", 1, 8, 1)
    result = train(
        model, parts, epochs=20, batch_size=BATCH, lr=1e-2, patience=patience, callbacks=(_spoil_from_epoch(3, saved),)
    )
    losses = [epoch.validation_loss for epoch in result.history]
    assert losses[1] < losses[0] < result.initial_validation_loss  # the first two epochs improve …
    assert all(loss > losses[1] for loss in losses[2:])  # … and the spoiled ones do not
    assert result.best_epoch == 2 and len(result.history) == 2 + patience and result.stopped_early
    assert _same_weights(_weights(model), saved)
    assert evaluate(model, parts["validation"])["loss"] == result.best_validation_loss == losses[1]
    assert all(parameter.grad is None for parameter in model.parameters())


def test_a_nan_validation_loss_stops_at_once_and_restores_the_initial_weights():
    parts, saved = _first_order(), {}
    model = build_model("gru", 1, 8, 1, seed=2)
    spoil = _spoil_from_epoch(1, saved, value=math.nan)
    result = train(model, parts, epochs=20, batch_size=BATCH, patience=5, callbacks=(spoil,))
    assert len(result.history) == 1 and result.stopped_early and result.best_epoch == 0
    assert math.isnan(result.history[0].validation_loss)
    assert _same_weights(_weights(model), _weights(build_model("gru", 1, 8, 1, seed=2)))
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert record["history"][0]["validation_loss"] is None and record["best_epoch"] == 0


def test_a_huge_learning_rate_ends_on_the_best_weights_seen():
    parts = _first_order()
    model = build_model("gru", 1, 8, 1)
    result = train(model, parts, epochs=20, batch_size=BATCH, lr=10.0, patience=1)
    seen = [result.initial_validation_loss, *(epoch.validation_loss for epoch in result.history)]
    assert result.stopped_early and result.best_validation_loss == min(seen)
    assert evaluate(model, parts["validation"])["loss"] == result.best_validation_loss


def test_same_seed_same_history_and_the_global_rng_is_left_alone():
    parts = _first_order()
    before = torch.get_rng_state()
    runs = [train(build_model("lstm", 1, 6, 1), parts, epochs=3, batch_size=BATCH, lr=1e-2, seed=s) for s in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), before)
    assert runs[0].history == runs[1].history and runs[0].metrics == runs[1].metrics
    assert all(isinstance(epoch, EpochStats) for epoch in runs[0].history)
    assert runs[0].history != runs[2].history  # another seed shuffles the batches differently


def test_batch_first_data_trains_exactly_as_time_major_data():
    results = [
        train(build_model("gru", 1, 6, 1), _first_order(batch_first=flag), epochs=2, batch_size=BATCH, washout=3)
        for flag in (False, True)
    ]
    assert results[0].history == results[1].history and results[0].metrics == results[1].metrics


# --------------------------------------------------------------------------------------------------- one-step mode


def _free_run_by_prefix(model: SequenceModel, u: Tensor) -> Tensor:
    """At each step t, run the whole model from h_0 on [u_1..u_t] paired with its own earlier predictions."""
    fed, inputs, outputs = torch.zeros(u.shape[1], model.head.out_features, dtype=u.dtype), [], []
    for u_t in u:
        inputs.append(torch.cat([u_t, fed], dim=-1))
        fed = model(torch.stack(inputs))[-1]
        outputs.append(fed)
    return torch.stack(outputs)


@pytest.mark.parametrize("kind", KINDS)
def test_free_run_feeds_back_the_models_own_predictions(kind):
    model = build_model(kind, 3, 5, 2, num_layers=2, dtype=F64)  # u has 1 feature, y 2 outputs: I + O = 3
    generator = torch.Generator().manual_seed(4)
    u = torch.randn(8, 3, 1, generator=generator, dtype=F64)
    with torch.no_grad():
        free = predict(model, u, mode="one-step")
        torch.testing.assert_close(free, _free_run_by_prefix(model, u), rtol=1e-12, atol=1e-12)
        # the one-step prediction fed with the free run's own outputs is the free run
        torch.testing.assert_close(predict(model, u, mode="one-step", targets=free), free, rtol=1e-12, atol=1e-12)


def test_one_step_prediction_reads_the_measured_outputs():
    model = build_model("gru", 2, 5, 1, dtype=F64)
    generator = torch.Generator().manual_seed(5)
    u, y = torch.randn(10, 3, 1, generator=generator, dtype=F64), torch.randn(10, 3, 1, generator=generator, dtype=F64)
    with torch.no_grad():
        one_step = predict(model, u, mode="one-step", targets=y)
        shifted = torch.cat([torch.zeros(1, 3, 1, dtype=F64), y[:-1]])  # y_{t−1}, y_0 = 0
        torch.testing.assert_close(one_step, model(torch.cat([u, shifted], dim=-1)), rtol=0, atol=0)
        changed = y.clone()
        changed[4] += 1.0  # a measurement at step index 4 reaches the predictions from index 5 on
        moved = (predict(model, u, mode="one-step", targets=changed) - one_step).abs().amax((1, 2))
        assert bool((moved[:5] == 0).all()) and bool((moved[5:] > 0).all())


def test_one_step_mode_trains_and_evaluates_both_errors():
    parts = _first_order()
    model = build_model("gru", 2, 8, 1)  # reads [u_t, y_{t−1}]
    result = train(model, parts, mode="one-step", epochs=4, batch_size=BATCH, lr=1e-2, washout=5)
    assert result.best_validation_loss < 0.5 * result.initial_validation_loss
    metrics = evaluate(model, parts["test"], mode="one-step", washout=5)
    assert metrics == result.metrics["test"]
    assert set(metrics) == {"loss", "rmse", "rmse_one_step", "rmse_free_run"}
    test = parts["test"]
    with torch.no_grad():
        one_step = predict(model, test.inputs, mode="one-step", targets=test.targets)
        free = _free_run_by_prefix(model, test.inputs)
    assert metrics["rmse_one_step"] == pytest.approx(math.sqrt(_mse(one_step, test.targets, 5)), rel=1e-5)
    assert metrics["rmse_free_run"] == pytest.approx(math.sqrt(_mse(free, test.targets, 5)), rel=1e-5)
    assert metrics["rmse"] == metrics["rmse_free_run"] != metrics["rmse_one_step"]
    assert metrics["loss"] == pytest.approx(metrics["rmse_one_step"] ** 2, rel=1e-12)


# ---------------------------------------------------------------------------------------- callbacks, output, JSON


def test_callbacks_are_called_once_per_optimiser_step():
    parts, calls = _first_order(), []
    model = build_model("gru", 1, 4, 1)

    def first(*, step, module, loss):
        grads = [parameter.grad for parameter in module.parameters()]
        calls.append(("first", step, module, loss, all(grad is not None for grad in grads), _weights(module)))

    def second(*, step, module, loss):
        calls.append(("second", step, module, loss))

    result = train(model, parts, epochs=3, batch_size=BATCH, patience=5, callbacks=[first, second])
    firsts = [call for call in calls if call[0] == "first"]
    assert [call[:2] for call in calls] == [
        (name, s) for s in range(3 * STEPS_PER_EPOCH) for name in ("first", "second")
    ]
    assert result.steps == len(firsts) == 3 * STEPS_PER_EPOCH
    assert all(call[2] is model and type(call[3]) is float and math.isfinite(call[3]) for call in calls)
    assert all(call[4] for call in firsts)  # the gradients are in .grad
    assert not any(_same_weights(a[5], b[5]) for a, b in zip(firsts, firsts[1:]))  # an optimiser step in between


def test_the_gatelens_monitor_plugs_in_as_a_callback():
    from gatelens.experiments.monitor import Monitor, MonitorWarning

    parts, losses = _first_order(), {}
    monitor = Monitor(parts["test"].inputs[:, :2], every=2, tensorboard=False)

    def record(*, step, module, loss):
        losses[step] = loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MonitorWarning)  # a collapse in 4 steps is not what this test is about
        train(build_model("gru", 1, 4, 1), parts, epochs=1, batch_size=BATCH, callbacks=(record, monitor))
    assert [row["step"] for row in monitor.records] == [0, 2]
    assert [row["loss"] for row in monitor.records] == [losses[0], losses[2]]


def test_nothing_is_printed_without_progress_and_a_bar_with_it(capsys):
    parts = _first_order()
    train(build_model("gru", 1, 4, 1), parts, epochs=1, batch_size=BATCH)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    train(build_model("gru", 1, 4, 1), parts, epochs=1, batch_size=BATCH, progress=True)
    assert "validation" in capsys.readouterr().out


def test_to_dict_is_json():
    result = train(build_model("gru", 1, 4, 1), _first_order(), epochs=2, batch_size=BATCH, clip=1.0, washout=2)
    record = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert [entry["epoch"] for entry in record["history"]] == [1, 2]
    assert set(record["history"][0]) == {
        "epoch", "train_loss", "validation_loss", "gradient_norm_mean", "gradient_norm_max"
    }  # fmt: skip
    assert set(record["metrics"]) == {"train", "validation", "test"}
    assert record["settings"] == {
        "mode": "simulation", "washout": 2, "epochs": 2, "batch_size": BATCH, "lr": 1e-3, "clip": 1.0,
        "patience": 10, "seed": 0,
    }  # fmt: skip
    assert record["best_validation_loss"] == result.best_validation_loss


# ------------------------------------------------------------------------------------------------------- bad input

FIRST_ORDER = _first_order()
GRU = build_model("gru", 1, 4, 1)
ONE_STEP = build_model("gru", 2, 4, 1)  # reads [u_t, y_{t−1}]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: build_model("transformer", 1, 4, 1), ValueError, "kind must be one of"),
        (lambda: build_model("gru", 0, 4, 1), ValueError, "input_size must be an int ≥ 1"),
        (lambda: build_model("gru", 1, 4, 1, num_layers=1.0), TypeError, "num_layers must be an int"),
        (lambda: build_model("elman", 1, 4, 1, chrono=20), ValueError, "Elman RNN .* has no gates"),
        (lambda: build_model("gru", 1, 4, 1, chrono=2), ValueError, "chrono .* > 2"),
        (lambda: build_model("lstm", 1, 4, 1, chrono=math.inf), ValueError, "chrono"),
        (lambda: build_model("gru", 1, 4, 1, dtype=torch.int32), TypeError, "dtype must be a floating"),
        (lambda: build_model("gru", 1, 4, 1, seed=-1), ValueError, "seed must be an int ≥ 0"),
        (lambda: train(GRU, FIRST_ORDER, epochs=0), ValueError, "epochs must be an int ≥ 1"),
        (lambda: train(GRU, FIRST_ORDER, epochs=2.0), TypeError, "epochs must be an int"),
        (lambda: train(GRU, FIRST_ORDER, batch_size=0), ValueError, "batch_size must be an int ≥ 1"),
        (lambda: train(GRU, FIRST_ORDER, lr=0.0), ValueError, "lr must be a finite number > 0"),
        (lambda: train(GRU, FIRST_ORDER, lr=-1e-3), ValueError, "lr must be a finite number > 0"),
        (lambda: train(GRU, FIRST_ORDER, clip=0.0), ValueError, "clip must be a finite number > 0"),
        (lambda: train(GRU, FIRST_ORDER, patience=0), ValueError, "patience must be an int ≥ 1"),
        (lambda: train(GRU, FIRST_ORDER, washout=-1), ValueError, "washout must be an int ≥ 0"),
        (lambda: train(GRU, FIRST_ORDER, washout=40), ValueError, r"washout must be less than .* \(40\)"),
        (lambda: train(GRU, FIRST_ORDER, mode="teacher"), ValueError, "mode must be one of"),
        (lambda: train(GRU, FIRST_ORDER, progress=1), TypeError, "progress must be True or False"),
        (lambda: train(GRU, FIRST_ORDER, callbacks=print), TypeError, "callbacks must be a sequence"),
        (lambda: train(GRU, FIRST_ORDER, callbacks=(1,)), TypeError, "each callback must be callable"),
        (lambda: train(nn.GRU(1, 4), FIRST_ORDER), TypeError, "model must be a SequenceModel"),
        (lambda: train(GRU, FIRST_ORDER["train"]), TypeError, "data must be a dict"),
        (lambda: train(GRU, {"train": FIRST_ORDER["train"]}), ValueError, r"missing \['validation', 'test'\]"),
        (lambda: train(GRU, FIRST_ORDER | {"extra": FIRST_ORDER["test"]}), ValueError, r"unexpected \['extra'\]"),
        (lambda: train(GRU, FIRST_ORDER | {"test": 0}), TypeError, r"data\['test'\] must be a Dataset"),
        (
            lambda: train(GRU, FIRST_ORDER | {"test": multi_timescale(20, 4, 0, delays=(1, 2))}),
            ValueError,
            r"data\['test'\] is not the same task",
        ),
        (lambda: train(build_model("gru", 2, 4, 1), FIRST_ORDER), ValueError, "model has 2 inputs .* needs 1"),
        (lambda: train(build_model("gru", 1, 4, 3), FIRST_ORDER), ValueError, "1 outputs"),
        (lambda: train(GRU, FIRST_ORDER, mode="one-step"), ValueError, r"needs 2 inputs \(I \+ O = 1 \+ 1\)"),
        (
            lambda: train(build_model("gru", 3, 4, 1), adding_problem(6, 20, 0).split(), mode="one-step"),
            ValueError,
            "one target per sequence",
        ),
        (
            lambda: train(
                build_model("gru", 8, 4, 4), copy_task(2, 20, 0, symbols=2, length=1).split(), mode="one-step"
            ),
            ValueError,
            "class targets",
        ),
        (
            lambda: train(build_model("gru", 2, 4, 1), adding_problem(6, 20, 0).split(), washout=1),
            ValueError,
            "washout is for targets at every step",
        ),
        (lambda: train(GRU, _first_order(dtype=F64)), TypeError, "dtype torch.float64 but the model is torch.float32"),
        (lambda: evaluate(GRU, FIRST_ORDER), TypeError, "dataset must be a Dataset"),
        (lambda: evaluate(GRU, FIRST_ORDER["test"], mode="free"), ValueError, "mode must be one of"),
        (lambda: predict(GRU, torch.zeros(5, 2, 2)), ValueError, r"inputs must have shape \(T, N, I\)"),
        (lambda: predict(GRU, torch.zeros(5, 2)), ValueError, r"inputs must have shape"),
        (lambda: predict(GRU, torch.zeros(5, 2, 1, dtype=F64)), TypeError, "inputs has dtype torch.float64"),
        (lambda: predict(GRU, torch.zeros(5, 2, 1), targets=torch.zeros(5, 2, 1)), ValueError, "targets are read only"),
        (
            lambda: predict(ONE_STEP, torch.zeros(5, 2, 1), mode="one-step", targets=torch.zeros(5, 3, 1)),
            ValueError,
            r"targets must have shape \(T, N, O\) = \(5, 2, 1\)",
        ),
    ],
)
def test_bad_input_is_refused_clearly(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_non_finite_data_is_refused():
    train_part = FIRST_ORDER["train"]
    spoiled = train_part.targets.clone()
    spoiled[3, 2, 0] = math.nan
    bad = type(train_part)(
        train_part.name, train_part.inputs, spoiled, train_part.loss_steps, train_part.config,
        split_along=train_part.split_along,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"data\['train'\].targets contains NaN"):
        train(GRU, FIRST_ORDER | {"train": bad})
