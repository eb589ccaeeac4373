"""Bad inputs are refused at the boundary with a ValueError or TypeError (FileNotFoundError for a missing file)
whose message says what was expected and what was given."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import gatelens as gl

I, H, T, B = 3, 5, 6, 3


@pytest.fixture
def gru() -> nn.GRU:
    torch.manual_seed(0)
    return nn.GRU(I, H).double()


@pytest.fixture
def model(gru: nn.GRU) -> gl.Model:
    return gl.load(gru)


@pytest.fixture
def lstm_model() -> gl.Model:
    torch.manual_seed(0)
    return gl.load(nn.LSTM(I, H, num_layers=2).double())


def x(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)


def gru_blocks(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Valid GRU weight blocks (I = 3, H = 4) with biases."""
    required, optional = gl.GRU.block_shapes(I, 4)
    generator = torch.Generator().manual_seed(0)
    return {
        name: torch.rand(shape, generator=generator, dtype=dtype) - 0.5 for name, shape in (required | optional).items()
    }


# ---------------------------------------------------------------------------------------------------------------
# x


@pytest.mark.parametrize("shape", [(T,), (T, B, I, 1)], ids=["1-D", "4-D"])
def test_wrong_input_rank(model: gl.Model, shape: tuple[int, ...]) -> None:
    expected = re.escape(f"x must be (T, B, I) or unbatched (T, I), got a {len(shape)}-D tensor of shape {shape}")
    with pytest.raises(ValueError, match=expected):
        model.trace(x(*shape))


def test_wrong_input_rank_names_the_batch_first_layout() -> None:
    torch.manual_seed(0)
    model = gl.load(nn.GRU(I, H, batch_first=True).double())
    with pytest.raises(ValueError, match=re.escape("x must be (B, T, I) or unbatched (T, I), got a 1-D tensor")):
        model.trace(x(T))


@pytest.mark.parametrize("shape", [(T, B, I + 1), (T, I - 1)], ids=["batched", "unbatched"])
def test_wrong_feature_size(model: gl.Model, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=rf"x has {shape[-1]} input features, expected {I}"):
        model.trace(x(*shape))


def test_empty_sequence(model: gl.Model) -> None:
    with pytest.raises(ValueError, match=r"at least one step.*got shape \(0, 3, 3\)"):
        model.trace(x(0, B, I))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_x(model: gl.Model, bad: float) -> None:
    values = x(T, B, I)
    values[2, 1, 0] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or Inf"):
        model.trace(values)


def test_nan_in_numpy_x(model: gl.Model) -> None:
    values = np.zeros((T, B, I))
    values[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"x contains NaN or Inf"):
        model.trace(values)


def test_float32_tensor_on_float64_model(model: gl.Model) -> None:
    with pytest.raises(TypeError, match=r"x has dtype torch\.float32 but the model is torch\.float64"):
        model.trace(x(T, B, I, dtype=torch.float32))


def test_integer_tensor_input(model: gl.Model) -> None:
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch\.int64"):
        model.trace(torch.zeros(T, B, I, dtype=torch.long))


@pytest.mark.parametrize("dtype,numpy_dtype", [(torch.complex128, "complex128"), (torch.bool, "bool")])
def test_input_that_is_not_real_numbers(model: gl.Model, dtype: torch.dtype, numpy_dtype: str) -> None:
    """One message whatever holds the values (and the command line gives it for a file of them)."""
    with pytest.raises(TypeError, match=rf"^x must hold real numbers, got a tensor of dtype torch\.{numpy_dtype}$"):
        model.trace(torch.zeros(T, B, I, dtype=dtype))
    with pytest.raises(TypeError, match=rf"^x must hold real numbers, got an array of dtype {numpy_dtype}$"):
        model.trace(np.zeros((T, B, I), dtype=numpy_dtype))


def test_input_of_unknown_type(model: gl.Model) -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor or a numpy array, got str"):
        model.trace("not an array")


# ---------------------------------------------------------------------------------------------------------------
# h0


def test_mismatched_h0_shape(model: gl.Model) -> None:
    expected = re.escape("h0 has shape (1, 2, 5), expected (1, 3, 5) (num_layers × directions, batch, features)")
    with pytest.raises(ValueError, match=expected):
        model.trace(x(T, B, I), x(1, 2, H))


def test_h0_with_wrong_width(model: gl.Model) -> None:
    with pytest.raises(ValueError, match=re.escape("h0 has shape (1, 3, 4), expected (1, 3, 5)")):
        model.trace(x(T, B, I), x(1, B, H - 1))


def test_single_tensor_h0_for_lstm(lstm_model: gl.Model) -> None:
    with pytest.raises(ValueError, match=r"h0 for a LSTM model must be a pair \(h0, c0\), got 1 tensor"):
        lstm_model.trace(x(T, B, I), x(2, B, H))


def test_pair_h0_for_gru(model: gl.Model) -> None:
    with pytest.raises(ValueError, match=r"h0 for a GRU model must be one tensor, got 2 tensor"):
        model.trace(x(T, B, I), (x(1, B, H), x(1, B, H)))


def test_mismatched_c0_shape(lstm_model: gl.Model) -> None:
    with pytest.raises(ValueError, match=re.escape("c0 has shape (1, 3, 5), expected (2, 3, 5)")):
        lstm_model.trace(x(T, B, I), (x(2, B, H), x(1, B, H)))


def test_nan_in_h0(model: gl.Model) -> None:
    h0 = x(1, B, H)
    h0[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"h0 contains NaN or Inf"):
        model.trace(x(T, B, I), h0)


def test_inf_in_c0(lstm_model: gl.Model) -> None:
    c0 = x(2, B, H)
    c0[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"c0 contains NaN or Inf"):
        lstm_model.trace(x(T, B, I), (x(2, B, H), c0))


def test_h0_dict_with_wrong_keys(lstm_model: gl.Model) -> None:
    with pytest.raises(ValueError, match=re.escape("h0 as a dict needs exactly the keys ['l0', 'l1'], got ['l0']")):
        lstm_model.trace(x(T, B, I), {"l0": x(B, 2 * H)})


def test_h0_dict_with_wrong_state_shape(lstm_model: gl.Model) -> None:
    # an LSTM recurrence's full state is [h, c], 2H wide
    with pytest.raises(ValueError, match=re.escape("h0['l1'] has shape (3, 5), expected (3, 10)")):
        lstm_model.trace(x(T, B, I), {"l0": x(B, 2 * H), "l1": x(B, H)})


def test_float32_h0_on_float64_model(model: gl.Model) -> None:
    with pytest.raises(TypeError, match=r"h0 has dtype torch\.float32 but the model is torch\.float64"):
        model.trace(x(T, B, I), x(1, B, H, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# lengths


def test_lengths_longer_than_t(model: gl.Model) -> None:
    with pytest.raises(
        ValueError, match=rf"lengths must lie in 1\.\.{T} \(the number of time steps\), got min 2, max 7"
    ):
        model.trace(x(T, B, I), lengths=[7, 2, 3])


def test_lengths_of_zero(model: gl.Model) -> None:
    with pytest.raises(ValueError, match=rf"lengths must lie in 1\.\.{T} .*got min 0, max 6"):
        model.trace(x(T, B, I), lengths=torch.tensor([6, 0, 3]))


def test_negative_lengths(model: gl.Model) -> None:
    with pytest.raises(ValueError, match=r"got min -1"):
        model.trace(x(T, B, I), lengths=[6, -1, 3])


@pytest.mark.parametrize("lengths", [[6, 3], [6, 3, 2, 1], [[6, 3, 2]]], ids=["too-few", "too-many", "2-D"])
def test_lengths_of_the_wrong_count(model: gl.Model, lengths: list) -> None:
    shape = re.escape(str(np.shape(lengths)))
    with pytest.raises(ValueError, match=rf"lengths has shape {shape}, expected \(3,\): one length per sequence"):
        model.trace(x(T, B, I), lengths=lengths)


def test_float_lengths_list(model: gl.Model) -> None:
    with pytest.raises(TypeError, match=r"lengths must be integers, got float64"):
        model.trace(x(T, B, I), lengths=[6.0, 3.0, 1.0])


def test_float_lengths_tensor(model: gl.Model) -> None:
    with pytest.raises(TypeError, match=r"lengths must be integers, got dtype torch\.float32"):
        model.trace(x(T, B, I), lengths=torch.tensor([6.0, 3.0, 1.0]))


# ---------------------------------------------------------------------------------------------------------------
# weights and conventions


def test_nan_weight_block() -> None:
    blocks = gru_blocks()
    blocks["W_hz"][1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"GRU: weight block W_hz contains NaN or Inf"):
        gl.GRU(weights=blocks)


def test_nan_in_state_dict(gru: nn.GRU) -> None:
    state = {name: tensor.clone() for name, tensor in gru.state_dict().items()}
    state["weight_hh_l0"][H + 1, 0] = float("nan")  # a row of the update gate's block W_hz
    with pytest.raises(ValueError, match=r"GRU: weight block W_hz contains NaN or Inf"):
        gl.load(state)


def test_inf_in_state_dict_bias() -> None:
    torch.manual_seed(0)
    state = {name: tensor.clone() for name, tensor in nn.LSTM(I, H).state_dict().items()}
    state["bias_ih_l0"][3 * H] = float("inf")  # the output gate's block
    with pytest.raises(ValueError, match=r"LSTM: weight block b_io contains NaN or Inf"):
        gl.load(state)


def test_unknown_block_names() -> None:
    blocks = gru_blocks()
    blocks["U_z"] = blocks["W_iz"].clone()  # the seed's name for W_iz, not a canonical block name
    with pytest.raises(ValueError, match=r"GRU: unknown weight block\(s\) \['U_z'\]; expected blocks \[.*'W_iz'.*\]"):
        gl.GRU(weights=blocks)


def test_missing_block() -> None:
    blocks = gru_blocks()
    del blocks["W_hn"]
    with pytest.raises(ValueError, match=r"GRU: missing weight block\(s\) \['W_hn'\]; given \["):
        gl.GRU(weights=blocks)


def test_wrongly_shaped_block() -> None:
    blocks = gru_blocks()
    blocks["W_hr"] = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=re.escape("GRU: weight block W_hr has shape (4, 3), expected (4, 4)")):
        gl.GRU(weights=blocks)


def test_some_biases_only() -> None:
    blocks = gru_blocks()
    del blocks["b_hn"]
    given = r"\['b_hr', 'b_hz', 'b_in', 'b_ir', 'b_iz'\]"
    with pytest.raises(ValueError, match=rf"GRU: give all of the biases \[.*\] or none; given only {given}"):
        gl.GRU(weights=blocks)


def test_mixed_dtype_blocks() -> None:
    blocks = gru_blocks()
    blocks["W_hr"] = blocks["W_hr"].float()
    with pytest.raises(
        ValueError,
        match=r"GRU: all weight blocks must share one dtype.*float32.*float64|"
        r"GRU: all weight blocks must share one dtype.*float64.*float32",
    ):
        gl.GRU(weights=blocks)


def test_reset_convention_unknown() -> None:
    with pytest.raises(ValueError, match=r"unknown reset placement 'middle'; expected one of 'after', 'before'"):
        gl.GRU.random(3, 4, reset="middle")


def test_update_convention_unknown() -> None:
    with pytest.raises(ValueError, match=r"unknown update convention 'foo'; expected one of 'keep', 'replace'"):
        gl.GRU.random(3, 4, update="foo")


@pytest.mark.parametrize("make", [gl.GRU.random, gl.LSTM.random], ids=["GRU", "LSTM"])
def test_bare_hard_sigmoid_is_ambiguous(make) -> None:
    with pytest.raises(ValueError, match=r"gate='hard_sigmoid' is ambiguous") as error:
        make(3, 4, gate="hard_sigmoid")
    message = str(error.value)
    # both Keras definitions, and the two names that choose between them
    assert "clip(0.2·a + 0.5, 0, 1)" in message and "clip(a/6 + 0.5, 0, 1)" in message
    assert "hard_sigmoid_keras2" in message and "hard_sigmoid_keras3" in message


def test_unknown_gate_activation() -> None:
    with pytest.raises(ValueError, match=r"unknown gate 'softmax'; expected one of 'sigmoid', 'hard_sigmoid_keras2'"):
        gl.GRU.random(3, 4, gate="softmax")


def test_unknown_candidate_and_nonlinearity() -> None:
    with pytest.raises(ValueError, match=r"unknown candidate 'sigmoid'; expected one of 'tanh', 'relu'"):
        gl.LSTM.random(3, 4, candidate="sigmoid")
    with pytest.raises(ValueError, match=r"unknown nonlinearity 'gelu'; expected one of 'tanh', 'relu'"):
        gl.Elman.random(3, 4, nonlinearity="gelu")


def test_model_layers_that_do_not_chain() -> None:
    with pytest.raises(ValueError, match=r"layer 1 expects 5 input features, but layer 0 outputs 4"):
        gl.Model([gl.GRU.random(3, 4), gl.GRU.random(5, 4)])


def test_bidirectional_layers_that_do_not_chain() -> None:
    # a bidirectional layer 0 outputs 2 × 4 features
    layer0 = (gl.GRU.random(3, 4), gl.GRU.random(3, 4, seed=1))
    layer1 = (gl.GRU.random(4, 4), gl.GRU.random(4, 4, seed=1))
    with pytest.raises(ValueError, match=r"layer 1 expects 4 input features, but layer 0 outputs 8 \(2 direction"):
        gl.Model([layer0, layer1])


def test_model_from_something_that_is_not_a_layer() -> None:
    with pytest.raises(TypeError, match=r"layer 0 must be a cell or a \(forward, reverse\) pair of cells, got 'GRU'"):
        gl.Model(["GRU"])


# ---------------------------------------------------------------------------------------------------------------
# loading: modules, objects, state_dicts, files


def test_load_a_linear_module() -> None:
    with pytest.raises(TypeError, match=r"Linear is not a recurrent module and holds 0 recurrent submodules \(none\)"):
        gl.load(nn.Linear(3, 4))


def test_load_a_module_with_two_recurrent_submodules() -> None:
    net = nn.Module()
    net.enc, net.dec = nn.GRU(I, H), nn.LSTM(I, H)
    with pytest.raises(TypeError, match=r"holds 2 recurrent submodules \(enc \(GRU\), dec \(LSTM\)\)"):
        gl.load(net)


def test_load_a_string_that_is_not_a_file(tmp_path) -> None:
    missing = tmp_path / "no-such-model.pt"
    with pytest.raises(FileNotFoundError, match=r"no such file: .*no-such-model\.pt"):
        gl.load(str(missing))


def test_load_a_directory(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"is a directory, expected a file saved with torch.save"):
        gl.load(tmp_path)


def test_load_a_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        gl.load(tmp_path / "missing.pt")


def test_a_numpy_file_is_not_a_checkpoint(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"x\.npy is a numpy file, not one saved with torch\.save"):
        gl.load(tmp_path / "x.npy")


def test_numpy_scalars_in_a_checkpoint_are_data(tmp_path) -> None:
    gru = torch.nn.GRU(2, 3)
    torch.save({"epoch": np.int64(3), "loss": np.float32(0.5), "model": gru.state_dict()}, tmp_path / "ckpt.pt")
    x = torch.randn(4, 1, 2)
    torch.testing.assert_close(gl.load(tmp_path / "ckpt.pt").trace(x).output, gru(x)[0].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", [3, 2.5, None, torch.zeros(3)], ids=["int", "float", "None", "tensor"])
def test_load_an_object_of_unknown_type(source) -> None:
    name = type(source).__name__
    with pytest.raises(TypeError, match=rf"cannot load a {name}; expected a torch RNN module"):
        gl.load(source)


def test_options_with_a_module(gru: nn.GRU) -> None:
    with pytest.raises(TypeError, match=r"a GRU carries its own settings; unexpected options \['batch_first'\]"):
        gl.load(gru, batch_first=True)


def test_state_dict_with_wrong_weight_hh_size(gru: nn.GRU) -> None:
    state = dict(gru.state_dict())
    state["weight_hh_l0"] = torch.zeros(3 * H, H + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight_hh_l0 has shape \(15, 6\): rows must be 1, 3 or 4 times the hidden"):
        gl.load(state)


def test_state_dict_whose_weight_hh_does_not_fit_the_kind(gru: nn.GRU) -> None:
    state = dict(gru.state_dict())
    state["weight_hh_l0"] = torch.zeros(4 * H, H, dtype=torch.float64)  # an LSTM's shape
    with pytest.raises(ValueError, match=r"weight_hh_l0 has shape \(20, 5\): a GRU needs 3·H rows, got 20 rows"):
        gl.load(state, kind="GRU")


def test_state_dict_with_wrong_bias_size(gru: nn.GRU) -> None:
    state = dict(gru.state_dict())
    state["bias_ih_l0"] = torch.zeros(3 * H - 1, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"bias_ih_l0 has shape \(14,\), expected \(15,\) for a GRU with hidden size 5"
    ):
        gl.load(state)


def test_state_dict_with_wrong_weight_ih_rows(gru: nn.GRU) -> None:
    state = dict(gru.state_dict())
    state["weight_ih_l0"] = torch.zeros(3 * H + 1, I, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weight_ih_l0 has shape \(16, 3\), expected \(15, 3\)"):
        gl.load(state)


def test_state_dict_with_layer_1_input_size_mismatch() -> None:
    torch.manual_seed(0)
    state = dict(nn.GRU(I, H, num_layers=2).state_dict())
    state["weight_ih_l1"] = torch.zeros(3 * H, H - 1)
    with pytest.raises(ValueError, match=r"layer 1 expects 4 input features, but layer 0 outputs 5"):
        gl.load(state)


def test_state_dict_with_only_one_bias(gru: nn.GRU) -> None:
    state = dict(gru.state_dict())
    del state["bias_hh_l0"]
    with pytest.raises(ValueError, match=r"found only one of bias_ih_l0 and bias_hh_l0; need both or neither"):
        gl.load(state)


def test_state_dict_with_a_missing_layer_weight() -> None:
    torch.manual_seed(0)
    state = dict(nn.GRU(I, H, num_layers=2).state_dict())
    del state["weight_hh_l1"]
    with pytest.raises(ValueError, match=r"missing weight_hh_l1; found \["):
        gl.load(state)


def test_rnn_state_dict_without_nonlinearity() -> None:
    state = nn.RNN(I, H).state_dict()
    with pytest.raises(ValueError, match=r"does not record an RNN's nonlinearity; pass nonlinearity='tanh' or 'relu'"):
        gl.load(state)


def test_state_dict_with_two_recurrent_prefixes() -> None:
    net = nn.Module()
    net.enc, net.dec = nn.GRU(I, H), nn.GRU(I, H)
    with pytest.raises(
        ValueError,
        match=r"expected one recurrent module in the state_dict, found 2 \('enc', 'dec'\); "
        r"pass prefix= to choose one",
    ):
        gl.load(net.state_dict())


def test_state_dict_with_an_unknown_prefix() -> None:
    net = nn.Module()
    net.enc = nn.GRU(I, H)
    with pytest.raises(ValueError, match=r"no recurrent weights under prefix 'dec'; found 'enc'"):
        gl.load(net.state_dict(), prefix="dec")


def test_state_dict_without_recurrent_weights() -> None:
    with pytest.raises(ValueError, match=r"found 0 \(none\).*keys should look like 'weight_ih_l0'"):
        gl.load(nn.Linear(3, 4).state_dict())


def test_state_dict_with_an_unknown_kind(gru: nn.GRU) -> None:
    with pytest.raises(ValueError, match=r"unknown kind 'Transformer'; expected one of 'GRU', 'LSTM', 'RNN'"):
        gl.load(gru.state_dict(), kind="Transformer")


def test_state_dict_with_integer_weights(gru: nn.GRU) -> None:
    state = dict(gru.state_dict())
    state["weight_hh_l0"] = torch.zeros(3 * H, H, dtype=torch.long)
    with pytest.raises(TypeError, match=r"weight_hh_l0 must be floating point, got torch\.int64"):
        gl.load(state)


def test_file_holding_a_whole_pickled_module(gru: nn.GRU, tmp_path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(gru, path)
    with pytest.raises(
        ValueError,
        match=r"whole\.pt holds a pickled Python object \(torch\.nn\.modules\.rnn\.GRU\).*"
        r"torch\.save\(module\.state_dict\(\)",
    ):
        gl.load(path)


def test_file_holding_a_tensor(tmp_path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=r"tensor\.pt holds a Tensor, expected a state_dict \(a dict of tensors\)"):
        gl.load(path)


def _random_bytes(seed: int) -> bytes:
    return bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(seed)).tolist())


# Contents that are no PyTorch file. torch.load fails on them in different ways (UnpicklingError, KeyError,
# IndexError, EOFError, ...); each must become a ValueError that names the file.
CORRUPT = {
    "random-bytes-0": _random_bytes(0),
    "random-bytes-3": _random_bytes(3),
    "text": b"this is not a torch file at all\n" * 10,
    "empty": b"",
    "truncated-zip": b"PK\x03\x04" + b"\x00" * 60,
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_corrupt_file_gives_value_error(tmp_path, content: bytes) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"corrupt\.pt (is not a readable PyTorch file|holds pickled Python objects)"):
        gl.load(path)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_bytes_are_not_mistaken_for_a_pickled_module(tmp_path, seed: int) -> None:
    """torch.load's weights-only unpickler rejects random bytes with an UnpicklingError ("Unsupported operand"),
    as it rejects a whole saved module ("Unsupported global"); only the latter is "a whole saved module?", and
    telling the user to save a state_dict instead would send them the wrong way. The file is simply unreadable."""
    path = tmp_path / "corrupt.pt"
    path.write_bytes(_random_bytes(seed))
    with pytest.raises(ValueError, match=r"corrupt\.pt is not a readable PyTorch file") as error:
        gl.load(path)
    assert "whole saved module" not in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# trace queries


def test_jacobians_of_a_layer_that_does_not_exist(model: gl.Model) -> None:
    trace = model.trace(x(T, B, I))
    with pytest.raises(ValueError, match=r"layer must be an int in 0\.\.0, got 5"):
        trace.jacobians(layer=5)
    with pytest.raises(ValueError, match=r"layer must be an int in 0\.\.0, got -1"):
        trace.jacobians(layer=-1)


def test_reverse_direction_on_a_unidirectional_model(model: gl.Model) -> None:
    trace = model.trace(x(T, B, I))
    with pytest.raises(
        ValueError, match=r"direction='reverse': this unidirectional model reads sequences forward only"
    ):
        trace.jacobians(layer=0, direction="reverse")


def test_unknown_direction(model: gl.Model) -> None:
    trace = model.trace(x(T, B, I))
    with pytest.raises(ValueError, match=r"unknown direction 'backward'; expected 'forward' or 'reverse'"):
        trace.jacobians(layer=0, direction="backward")


def test_jacobians_without_a_layer_on_a_bidirectional_model() -> None:
    torch.manual_seed(0)
    trace = gl.load(nn.GRU(I, H, num_layers=2, bidirectional=True).double()).trace(x(T, B, I))
    with pytest.raises(ValueError, match=r"a bidirectional model is not one recurrence.*pass layer= \(0\.\.1\)"):
        trace.jacobians()


def test_jacobians_of_a_step_out_of_range(model: gl.Model) -> None:
    trace = model.trace(x(T, B, I))
    with pytest.raises(ValueError, match=rf"step index {T} is out of range for a trace of {T} steps"):
        trace.jacobians(layer=0, steps=T)
    with pytest.raises(ValueError, match=rf"step indices must lie in -{T}\.\.{T - 1}, got \[0, 9\]"):
        trace.jacobians(layer=0, steps=[0, 9])


def test_options_with_a_model_or_cells_are_not_ignored(gru: nn.GRU) -> None:
    model = gl.load(gru)
    with pytest.raises(TypeError, match=r"a Model carries its own settings; unexpected options \['batch_first'\]"):
        gl.load(model, batch_first=True)
    with pytest.raises(TypeError, match=r"cells take only the option batch_first; unexpected options \['prefix'\]"):
        gl.load(gl.GRU.random(3, 4), prefix="x")
    with pytest.raises(ValueError, match=r"nonlinearity= applies to an RNN only; this state_dict holds a GRU"):
        gl.load(gru.state_dict(), nonlinearity="relu")


def test_bad_step_selections(model: gl.Model) -> None:
    trace = model.trace(x(T, B, I))
    for steps in (True, 1.5, [1.0], "a", [[0, 1]]):
        with pytest.raises(TypeError, match=r"steps must be an int, a slice or a (1-D )?list of ints"):
            trace.jacobians(steps=steps)
    assert trace.jacobians(steps=[]).shape[0] == 0
    assert torch.equal(trace.jacobians(layer=np.int64(0), steps=np.int64(1)), trace.jacobians(steps=1))
    with pytest.raises(TypeError, match=r"layer must be an int in 0\.\.0, got True"):
        trace.jacobians(layer=True)


def test_adjoints_of_the_wrong_shape_or_dtype(model: gl.Model) -> None:
    rec = model.trace(x(T, B, I)).recurrence()
    size = rec.cell.state_size
    with pytest.raises(
        ValueError, match=rf"v must have shape \(\.\.\., {T}, {B}, {size}\).*got \({T}, {B}, {size - 1}\)"
    ):
        rec.state_vjp(torch.zeros(T, B, size - 1, dtype=rec.states.dtype))
    with pytest.raises(ValueError, match=rf"v must have shape \(\.\.\., {T}, {B}, {size}\).*got \({T - 2}, {B}"):
        rec.param_vjp(torch.zeros(T - 2, B, size, dtype=rec.states.dtype))
    with pytest.raises(TypeError, match=r"v has dtype torch.float16, expected the trace's"):
        rec.input_vjp(torch.zeros(T, B, size, dtype=torch.float16))


def test_one_dimensional_sizing_block() -> None:
    with pytest.raises(ValueError, match=r"GRU: weight block W_iz must be a 2-D tensor \(hidden, inputs\), got \(4,\)"):
        gl.GRU({"W_iz": torch.zeros(4)})


def test_bool_lengths_complex_and_ragged_inputs(model: gl.Model) -> None:
    with pytest.raises(TypeError, match=r"lengths must be integers, got dtype torch.bool"):
        model.trace(x(T, B, I), lengths=torch.ones(B, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"x must hold real numbers, got an array of dtype complex128"):
        model.trace(np.zeros((T, B, I), dtype=complex))
    with pytest.raises(ValueError, match=r"x must be a rectangular array"):
        model.trace([[[0.0] * I], [[0.0] * (I + 1)]])
