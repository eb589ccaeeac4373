"""The LSTM cell (gate order i, f, g, o), with optional output projection (PyTorch's proj_size).

With σ the gate activation and φ the candidate activation (tanh unless stated):

    i = σ(W_ii x + b_ii + W_hi h + b_hi)      f = σ(W_if x + b_if + W_hf h + b_hf)
    g = φ(W_ig x + b_ig + W_hg h + b_hg)      o = σ(W_io x + b_io + W_ho h + b_ho)
    c' = f ⊙ c + i ⊙ g
    m  = o ⊙ φ(c')
    h' = W_proj m   with a projection (W_proj: P × H),   h' = m   without (P = H)

The state is s = [h, c] (P + H wide) and the output is h. With D = diag(o ⊙ φ'(c')) (∂m/∂c') and
Π = W_proj (or the identity), the Jacobian ∂[h', c']/∂[h, c] is the sum of five paths, each written as its
c-rows (∂c'/∂·) and its h-rows (Π D · the c-rows, plus the output gate's own term):

    carry      c-rows, c-cols: diag(f)                     the cell-state highway
    forget     c-rows, h-cols: diag(c ⊙ σ'(a_f)) W_hf
    input      c-rows, h-cols: diag(g ⊙ σ'(a_i)) W_hi
    candidate  c-rows, h-cols: diag(i ⊙ φ'(a_g)) W_hg
    output     h-rows, h-cols: Π diag(φ(c') ⊙ σ'(a_o)) W_ho   (no c-rows)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gatelens.activations import Activation
from gatelens.cells.base import (
    Cell,
    Clamp,
    Factor,
    MemoryGates,
    affine,
    diag_times,
    gate_values,
    sizing_block,
    uniform_weights,
)

GATES = ("i", "f", "g", "o")


@dataclass(frozen=True)
class LSTMCache:
    """Gates of one or many LSTM steps: x (..., B, I), h (..., B, P), the rest (..., B, H)."""

    x: Tensor
    h: Tensor  # previous output state
    c: Tensor  # previous cell state
    i: Tensor
    f: Tensor
    f_complement: Tensor  # 1 − f, formed as σ(−a_f): the leak of the cell state
    g: Tensor
    o: Tensor
    di: Tensor  # σ'(a_i)
    df: Tensor  # σ'(a_f)
    dg: Tensor  # φ'(a_g)
    do: Tensor  # σ'(a_o)
    tc: Tensor  # φ(c')
    dtc: Tensor  # φ'(c')


@dataclass(frozen=True, eq=False, repr=False)
class LSTM(Cell):
    """An LSTM cell; ``weights``: W_ii, W_if, W_ig, W_io (H, I); W_hi, W_hf, W_hg, W_ho (H, P);
    optionally all eight biases b_ii … b_ho (H,); optionally W_proj (P, H) for an output projection."""

    weights: Mapping[str, Tensor]
    gate: str = "sigmoid"
    candidate: str = "tanh"
    kind = "LSTM"
    gate_names = ("i", "f", "o")
    _gate: Activation = field(init=False, repr=False)
    _candidate: Activation = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._adopt_gated_activations()
        hidden, inputs = sizing_block("LSTM", self.weights, "W_ii")
        projection = sizing_block("LSTM", self.weights, "W_proj")[0] if "W_proj" in self.weights else None
        required, biases = self.block_shapes(inputs, hidden, projection)
        out = projection or hidden
        self._adopt_weights(
            required, biases, input_size=inputs, hidden_size=hidden, output_size=out, state_size=out + hidden
        )

    @staticmethod
    def block_shapes(
        input_size: int, hidden_size: int, projection: int | None = None
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int]]]:
        """Expected shapes of the weight matrices (required, with W_proj if projected) and of the biases."""
        out = projection or hidden_size
        required = {f"W_i{g}": (hidden_size, input_size) for g in GATES}
        required |= {f"W_h{g}": (hidden_size, out) for g in GATES}
        if projection is not None:
            required["W_proj"] = (projection, hidden_size)
        return required, {f"b_{side}{g}": (hidden_size,) for side in "ih" for g in GATES}

    @classmethod
    def random(
        cls,
        input_size: int,
        hidden_size: int,
        *,
        projection: int | None = None,
        gate: str = "sigmoid",
        candidate: str = "tanh",
        bias: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> LSTM:
        """An LSTM with PyTorch's default initialisation U(−1/√H, 1/√H), reproducible from ``seed``."""
        required, biases = cls.block_shapes(input_size, hidden_size, projection)
        weights = uniform_weights(required | biases if bias else required, hidden_size, seed, dtype)
        return cls(weights, gate=gate, candidate=candidate)

    @property
    def path_names(self) -> tuple[str, ...]:
        return ("carry", "forget", "input", "candidate", "output")

    def step(self, x: Tensor, state: Tensor, clamp: Clamp | None = None) -> tuple[Tensor, LSTMCache]:
        w = self.weights
        h, c = state[..., : self.output_size], state[..., self.output_size :]
        a = {g: affine(x, w[f"W_i{g}"], w.get(f"b_i{g}")) + affine(h, w[f"W_h{g}"], w.get(f"b_h{g}")) for g in GATES}
        gates = {name: gate_values(self._gate, name, a[name], clamp) for name in self.gate_names}
        (i, _, di), (f, f_complement, df), (o, _, do) = gates["i"], gates["f"], gates["o"]
        g = self._candidate.function(a["g"])
        new_c = f * c + i * g
        tc = self._candidate.function(new_c)
        new_h = self._project(o * tc)
        cache = LSTMCache(
            x=x,
            h=h,
            c=c,
            i=i,
            f=f,
            f_complement=f_complement,
            g=g,
            o=o,
            di=di,
            df=df,
            dg=self._candidate.derivative(a["g"], g),
            do=do,
            tc=tc,
            dtc=self._candidate.derivative(new_c, tc),
        )
        return torch.cat([new_h, new_c], dim=-1), cache

    def memory_gates(self, cache: LSTMCache) -> MemoryGates:
        """Per cell unit: carry f, admit and gate i (the input gate on the candidate), leak 1 − f = σ(−a_f)."""
        return MemoryGates(carry=cache.f, admit=cache.i, gate=cache.i, leak=cache.f_complement)

    def state_labels(self) -> list[str]:
        return [f"h{j}" for j in range(self.output_size)] + [f"c{j}" for j in range(self.hidden_size)]

    def unit_labels(self) -> list[str]:
        return [f"c{j}" for j in range(self.hidden_size)]

    def _project(self, m: Tensor) -> Tensor:
        """h' = W_proj m, or m without a projection."""
        return affine(m, self.weights["W_proj"], None) if "W_proj" in self.weights else m

    def _project_rows(self, m_rows: Tensor) -> Tensor:
        """Rows of ∂m/∂· ↦ rows of ∂h'/∂·: Π · m_rows, with Π = W_proj or the identity."""
        return self.weights["W_proj"] @ m_rows if "W_proj" in self.weights else m_rows

    def _h_rows(self, cache: LSTMCache, c_rows: Tensor) -> Tensor:
        """The h'-rows of a path from its c'-rows: Π diag(o ⊙ φ'(c')) · c_rows."""
        return self._project_rows(diag_times(cache.o * cache.dtc, c_rows))

    def _matrix(self, **blocks: Tensor) -> Tensor:
        """A (…, S, S) matrix from blocks named by row part and column part: hh, hc, ch, cc."""
        first = next(iter(blocks.values()))
        out = first.new_zeros(*first.shape[:-2], self.state_size, self.state_size)
        parts = {"h": slice(0, self.output_size), "c": slice(self.output_size, None)}
        for name, block in blocks.items():
            out[..., parts[name[0]], parts[name[1]]] = block
        return out

    def jacobian_paths(self, cache: LSTMCache) -> dict[str, Tensor]:
        w = self.weights
        keep = torch.diag_embed(cache.f)
        paths = {"carry": self._matrix(hc=self._h_rows(cache, keep), cc=keep)}
        for name, gate, scale in (
            ("forget", "f", cache.c * cache.df),
            ("input", "i", cache.g * cache.di),
            ("candidate", "g", cache.i * cache.dg),
        ):
            c_rows = diag_times(scale, w[f"W_h{gate}"])
            paths[name] = self._matrix(hh=self._h_rows(cache, c_rows), ch=c_rows)
        paths["output"] = self._matrix(hh=self._output_gate_rows(cache, w["W_ho"]))
        return paths

    def _output_gate_rows(self, cache: LSTMCache, weight: Tensor) -> Tensor:
        """The output gate's own h'-rows: Π diag(φ(c') ⊙ σ'(a_o)) · weight."""
        return self._project_rows(diag_times(cache.tc * cache.do, weight))

    def input_jacobian(self, cache: LSTMCache) -> Tensor:
        w = self.weights
        c_rows = (
            diag_times(cache.c * cache.df, w["W_if"])
            + diag_times(cache.g * cache.di, w["W_ii"])
            + diag_times(cache.i * cache.dg, w["W_ig"])
        )
        h_rows = self._h_rows(cache, c_rows) + self._output_gate_rows(cache, w["W_io"])
        return torch.cat([h_rows, c_rows], dim=-2)

    def _adjoints(self, cache: LSTMCache, v: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Adjoints of v = [v_h, v_c] at the four pre-activations, and the total adjoint at c'."""
        v_h, v_c = v[..., : self.output_size], v[..., self.output_size :]
        v_m = v_h @ self.weights["W_proj"] if "W_proj" in self.weights else v_h
        v_new_c = v_c + v_m * cache.o * cache.dtc
        gates = {
            "i": v_new_c * cache.g * cache.di,
            "f": v_new_c * cache.c * cache.df,
            "g": v_new_c * cache.i * cache.dg,
            "o": v_m * cache.tc * cache.do,
        }
        return gates, v_new_c

    def state_vjp(self, cache: LSTMCache, v: Tensor) -> Tensor:
        gates, v_new_c = self._adjoints(cache, v)
        v_h = sum(gates[g] @ self.weights[f"W_h{g}"] for g in GATES)
        return torch.cat([v_h, v_new_c * cache.f], dim=-1)

    def input_vjp(self, cache: LSTMCache, v: Tensor) -> Tensor:
        gates, _ = self._adjoints(cache, v)
        return sum(gates[g] @ self.weights[f"W_i{g}"] for g in GATES)

    def param_factors(self, cache: LSTMCache, v: Tensor) -> dict[str, Factor]:
        gates, _ = self._adjoints(cache, v)
        factors = {f"W_i{g}": Factor(gates[g], cache.x) for g in GATES}
        factors |= {f"W_h{g}": Factor(gates[g], cache.h) for g in GATES}
        if "b_ii" in self.weights:
            factors |= {f"b_{side}{g}": Factor(gates[g], None) for side in "ih" for g in GATES}
        if "W_proj" in self.weights:
            factors["W_proj"] = Factor(v[..., : self.output_size], cache.o * cache.tc)
        return factors
