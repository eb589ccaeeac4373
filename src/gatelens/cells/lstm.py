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

Forward products follow the chain rule without forming J: for a state tangent v = [v_h, v_c] (an input tangent v_x:
W_i· for W_h·, and no f ⊙ v_c), with ȧ_p = W_hp v_h and s_p = ∂c'/∂a_p (s_f = c ⊙ σ'(a_f), s_i = g ⊙ σ'(a_i),
s_g = i ⊙ φ'(a_g)),

    ċ' = f ⊙ v_c + Σ_{p=f,i,g} s_p ⊙ ȧ_p,     ḣ' = Π (o ⊙ φ'(c') ⊙ ċ' + φ(c') ⊙ σ'(a_o) ⊙ ȧ_o).

‖J‖_F² = ‖Π M‖_F² + ‖C‖_F², C = ∂c'/∂[h, c] and M = ∂m/∂[h, c], whose rows are combinations of the rows of the
W_h· (and one diagonal entry): exact without a projection, bounded by ‖Π‖₂ ‖M‖_F with one.

Local gradients sum the adjoints of the one-hot covectors on [h', c']. With v_c' = v_c + (v_h Π) ⊙ o ⊙ φ'(c'), the
gates' adjoints are v_c' ⊙ d_p (d_f = c ⊙ σ'(a_f), d_i = g ⊙ σ'(a_i), d_g = i ⊙ φ'(a_g)) and (v_h Π) ⊙ φ(c') ⊙ σ'(a_o),
so Σ_j ‖δ_p(e_j)‖² = Σ_k d_{p,k}² (1 + (o ⊙ φ'(c'))_k² ‖Π[:, k]‖²) and
Σ_j ‖δ_o(e_j)‖² = Σ_k (φ(c') ⊙ σ'(a_o))_k² ‖Π[:, k]‖².
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
    Covectors,
    Factor,
    FactorEnergy,
    MemoryGates,
    NormBounds,
    affine,
    closed_form_elements,
    covector_product,
    covector_rows,
    covector_weights,
    diag_times,
    forms_for,
    gate_values,
    row_norm_bounds,
    row_norms,
    scaled_sum_energies,
    sizing_block,
    spectral_norm,
    square_sum,
    uniform_weights,
    unit_energy,
    wide_dtype,
)

GATES = ("i", "f", "g", "o")
CELL_GATES = ("f", "i", "g")  # the gates that feed the cell state c' (the output gate feeds h' alone)
FORM_CELL_ROWS_FROM = 128  # covectors per sequence from which M = Σ diag(s_p) W_p pays (both ways alike at H = 256)
PATH_GATES = {"forget": "f", "input": "i", "candidate": "g", "output": "o"}  # the gate each non-carry path crosses


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
    _stacked: dict[str, Tensor] = field(init=False, repr=False)  # W_i, W_h (and b_i, b_h): the gates' blocks stacked

    def __post_init__(self) -> None:
        self._adopt_gated_activations()
        hidden, inputs = sizing_block("LSTM", self.weights, "W_ii")
        projection = sizing_block("LSTM", self.weights, "W_proj")[0] if "W_proj" in self.weights else None
        required, biases = self.block_shapes(inputs, hidden, projection)
        out = projection or hidden
        self._adopt_weights(
            required, biases, input_size=inputs, hidden_size=hidden, output_size=out, state_size=out + hidden
        )
        blocks = [f"{kind}_{side}" for kind in ("W", "b") for side in "ih" if f"{kind}_{side}i" in self.weights]
        stacked = {block: torch.cat([self.weights[f"{block}{g}"] for g in GATES]) for block in blocks}
        object.__setattr__(self, "_stacked", stacked)  # one product per side instead of one per gate

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
        h, c = state[..., : self.output_size], state[..., self.output_size :]
        a = self._by_gate(
            affine(x, self._stacked["W_i"], self._stacked.get("b_i"))
            + affine(h, self._stacked["W_h"], self._stacked.get("b_h"))
        )
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

    def _gate_gains(self, cache: LSTMCache) -> dict[str, Tensor]:
        """The gain d_p of each gate's adjoint: δ_p = v_c' ⊙ d_p for p = f, i, g (:meth:`_cell_scales`), and
        δ_o = v_m ⊙ d_o with d_o = φ(c') ⊙ σ'(a_o)."""
        return self._cell_scales(cache) | {"o": cache.tc * cache.do}

    def _adjoints(self, cache: LSTMCache, v: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Adjoints of v = [v_h, v_c] at the four pre-activations, and the total adjoint at c'
        (:meth:`_covector_parts`)."""
        v_m, v_new_c = self._covector_parts(cache, v)
        gates = {gate: (v_m if gate == "o" else v_new_c) * gain for gate, gain in self._gate_gains(cache).items()}
        return gates, v_new_c

    def _covector_parts(self, cache: LSTMCache, v: Tensor) -> tuple[Tensor, Tensor]:
        """v_m = v_h Π and the total adjoint at c', v_c' = v_c + v_m ⊙ o ⊙ φ'(c'), for v = [v_h, v_c]."""
        v_h, v_c = v[..., : self.output_size], v[..., self.output_size :]
        v_m = v_h @ self.weights["W_proj"] if "W_proj" in self.weights else v_h
        return v_m, v_c + v_m * cache.o * cache.dtc

    def state_vjp(self, cache: LSTMCache, v: Tensor) -> Tensor:
        """v · J: the gates' terms on the h-columns (:meth:`_through_gates`), v_c' ⊙ f on the c-columns."""
        v_m, v_new_c = self._covector_parts(cache, v)
        return torch.cat([self._through_gates(cache, v_m, v_new_c, "h"), v_new_c * cache.f], dim=-1)

    def input_vjp(self, cache: LSTMCache, v: Tensor) -> Tensor:
        return self._through_gates(cache, *self._covector_parts(cache, v), "i")

    def _through_gates(self, cache: LSTMCache, v_m: Tensor, v_new_c: Tensor, side: str) -> Tensor:
        """Σ_p δ_p W_{side p} (side "h": the h-columns of v · J, "i": v · ∂s'/∂x), with δ_p = v_c' ⊙ s_p for
        p = f, i, g and δ_o = v_m ⊙ d_o (:meth:`_gate_gains`): one product of [δ_i, δ_f, δ_g, δ_o] with the stacked
        blocks (4H rows) per covector, or, from FORM_CELL_ROWS_FROM covectors per sequence on (:func:`forms_for`),
        v_c' M + δ_o W_{side o} through M = Σ_{p=f,i,g} diag(s_p) W_{side p} formed once per sequence."""
        gains, w = self._gate_gains(cache), self.weights
        if not forms_for(cache, v_new_c, FORM_CELL_ROWS_FROM):
            adjoints = torch.cat([(v_m if g == "o" else v_new_c) * gains[g] for g in GATES], dim=-1)
            return adjoints @ self._stacked[f"W_{side}"]
        cell_rows = sum(diag_times(gains[g], w[f"W_{side}{g}"]) for g in CELL_GATES)
        return covector_product(v_new_c, cell_rows) + (v_m * gains["o"]) @ w[f"W_{side}o"]  # type: ignore[arg-type]

    def _cell_scales(self, cache: LSTMCache) -> dict[str, Tensor]:
        """s_p = ∂c'/∂a_p for the gates feeding the cell state: c ⊙ σ'(a_f), g ⊙ σ'(a_i), i ⊙ φ'(a_g)."""
        return {"f": cache.c * cache.df, "i": cache.g * cache.di, "g": cache.i * cache.dg}

    def _by_gate(self, stacked: Tensor) -> dict[str, Tensor]:
        """The four gates' parts (views) of a product with the stacked blocks, (..., 4H) ↦ (..., H) each."""
        return dict(zip(GATES, stacked.split(self.hidden_size, dim=-1)))

    def _new_state_tangent(self, cache: LSTMCache, v: Tensor, side: str, carried: Tensor | None) -> Tensor:
        """[ḣ', ċ'] for a tangent v of the input of the W_{side}· blocks (side "h": v_h, "i": x) and the carried part
        f ⊙ v_c of ċ' (None for x):

            ċ' = f ⊙ v_c + Σ_{p=f,i,g} s_p ⊙ (W_p v),     ḣ' = Π (o ⊙ φ'(c') ⊙ ċ' + φ(c') ⊙ σ'(a_o) ⊙ (W_o v))
        """
        tangents = self._by_gate(affine(v, self._stacked[f"W_{side}"], None))
        new_c = sum(scale * tangents[gate] for gate, scale in self._cell_scales(cache).items())
        if carried is not None:
            new_c = carried + new_c
        m = cache.o * cache.dtc * new_c + cache.tc * cache.do * tangents["o"]
        return torch.cat([self._project(m), new_c], dim=-1)

    def state_jvp(self, cache: LSTMCache, v: Tensor) -> Tensor:
        """J [v_h, v_c] = [ḣ', ċ'] with ċ' = f ⊙ v_c + Σ_p s_p ⊙ (W_hp v_h) (module docstring)."""
        v_h, v_c = v[..., : self.output_size], v[..., self.output_size :]
        return self._new_state_tangent(cache, v_h, "h", cache.f * v_c)

    def input_jvp(self, cache: LSTMCache, v: Tensor) -> Tensor:
        """∂[h', c']/∂x v = [ḣ', ċ'] with ċ' = Σ_p s_p ⊙ (W_ip v) (module docstring)."""
        return self._new_state_tangent(cache, v, "i", None)

    def _row_norms(self, cache: LSTMCache, side: str) -> tuple[Tensor, Tensor]:
        """Row norms (..., H) of ∂m/∂u and ∂c'/∂u through the W_{side}· blocks (u = h for side "h", x for "i"): rows
        o_i φ'(c'_i) Σ_p s_{p,i} W_p[i, :] + φ(c'_i) σ'(a_o,i) W_o[i, :] and Σ_p s_{p,i} W_p[i, :], p = f, i, g."""
        scales = self._cell_scales(cache)
        weights = [self.weights[f"W_{side}{gate}"] for gate in scales]
        gain = cache.o * cache.dtc  # ∂m/∂c'
        output_scales = [gain * scale for scale in scales.values()] + [cache.tc * cache.do]
        output_rows = row_norms(output_scales, [*weights, self.weights[f"W_{side}o"]])
        return output_rows, row_norms(list(scales.values()), weights)

    def _row_bounds(self, cache: LSTMCache, side: str) -> tuple[NormBounds, NormBounds]:
        """:meth:`_row_norms` as bounds, rounding included (:func:`row_norm_bounds`)."""
        scales = self._cell_scales(cache)
        weights = [self.weights[f"W_{side}{gate}"] for gate in scales]
        gain = cache.o * cache.dtc
        output_scales = [gain * scale for scale in scales.values()] + [cache.tc * cache.do]
        output_rows = row_norm_bounds(output_scales, [*weights, self.weights[f"W_{side}o"]])
        return output_rows, row_norm_bounds(list(scales.values()), weights)

    def _projected_rows(self, m_rows: NormBounds, m_norm: Tensor) -> NormBounds:
        """Bounds on the rows of h' = Π m from those of m: themselves without a projection; with one, 0 ≤
        ‖Π[i, :] M‖ ≤ ‖Π[i, :]‖ ‖M‖_F, given U ≥ ‖M‖_F (``m_norm``, shape (...))."""
        if "W_proj" not in self.weights:
            return m_rows
        upper = torch.linalg.vector_norm(self.weights["W_proj"], dim=-1) * m_norm.unsqueeze(-1)
        return NormBounds(torch.zeros_like(upper), upper)

    def jacobian_row_bounds(self, cache: LSTMCache) -> NormBounds:
        """Rows of h' from M = [∂m/∂h, diag(o ⊙ φ'(c') ⊙ f)] (through Π with a projection, :meth:`_projected_rows`)
        and of c' from C = [∂c'/∂h, diag(f)], each a gate part (:meth:`_row_bounds`) and a diagonal entry."""
        m_rows, c_rows = self._row_bounds(cache, "h")
        on_c = cache.o * cache.dtc * cache.f
        m_rows = NormBounds(*(torch.hypot(rows, on_c) for rows in m_rows))
        m_rows = self._projected_rows(m_rows, torch.linalg.vector_norm(m_rows.upper, dim=-1))
        c_rows = NormBounds(*(torch.hypot(rows, cache.f) for rows in c_rows))
        return NormBounds(*(torch.cat(pair, dim=-1) for pair in zip(m_rows, c_rows)))

    def input_jacobian_row_bounds(self, cache: LSTMCache) -> Tensor:
        """Upper bounds on the rows of ∂h'/∂x (through Π with a projection) and ∂c'/∂x (:meth:`_row_bounds`)."""
        m_rows, c_rows = self._row_bounds(cache, "i")
        m_rows = self._projected_rows(m_rows, torch.linalg.vector_norm(m_rows.upper, dim=-1))
        return torch.cat([m_rows.upper, c_rows.upper], dim=-1)

    def _projected_norm_bounds(self, m_norm: Tensor, c_norm: Tensor) -> NormBounds:
        """Bounds on ‖[Π M; C]‖_F from ‖M‖_F and ‖C‖_F: the norm itself without a projection (Π = I); with one,
        ‖C‖_F ≤ · ≤ √(‖Π‖₂² ‖M‖_F² + ‖C‖_F²)."""
        if "W_proj" not in self.weights:
            norm = torch.hypot(m_norm, c_norm)
            return NormBounds(norm, norm)
        return NormBounds(c_norm, torch.hypot(spectral_norm(self.weights["W_proj"]) * m_norm, c_norm))

    def jacobian_norm_bounds(self, cache: LSTMCache) -> NormBounds:
        """‖J‖_F² = ‖Π M‖_F² + ‖C‖_F², with M = [∂m/∂h, diag(o ⊙ φ'(c') ⊙ f)] and C = [∂c'/∂h, diag(f)] from
        :meth:`_row_norms`: exact without a projection, ‖C‖_F ≤ ‖J‖_F ≤ √(‖Π‖₂² ‖M‖_F² + ‖C‖_F²) with one."""
        m_rows, c_rows = self._row_norms(cache, "h")
        m_norm = torch.linalg.vector_norm(torch.cat([m_rows, cache.o * cache.dtc * cache.f], dim=-1), dim=-1)
        c_norm = torch.linalg.vector_norm(torch.cat([c_rows, cache.f], dim=-1), dim=-1)
        return self._projected_norm_bounds(m_norm, c_norm)

    def input_jacobian_norm_bound(self, cache: LSTMCache) -> Tensor:
        """‖∂[h', c']/∂x‖_F from the rows of ∂m/∂x and ∂c'/∂x (:meth:`_row_norms`): exact without a projection,
        √(‖Π‖₂² ‖∂m/∂x‖_F² + ‖∂c'/∂x‖_F²) with one."""
        m_rows, c_rows = self._row_norms(cache, "i")
        norms = (torch.linalg.vector_norm(rows, dim=-1) for rows in (m_rows, c_rows))
        return self._projected_norm_bounds(*norms).upper

    def param_factors(self, cache: LSTMCache, v: Tensor) -> dict[str, Factor]:
        gates, _ = self._adjoints(cache, v)
        adjoints = gates | {"proj": v[..., : self.output_size]}
        return {block: Factor(adjoints[adjoint], u) for block, (adjoint, u) in self._block_inputs(cache).items()}

    def _block_inputs(self, cache: LSTMCache) -> dict[str, tuple[str, Tensor | None]]:
        """Each weight block's adjoint (a gate, or "proj": v_h for W_proj) and input u (None for a bias)."""
        blocks: dict[str, tuple[str, Tensor | None]] = {f"W_i{g}": (g, cache.x) for g in GATES}
        blocks |= {f"W_h{g}": (g, cache.h) for g in GATES}
        if "b_ii" in self.weights:
            blocks |= {f"b_{side}{g}": (g, None) for side in "ih" for g in GATES}
        if "W_proj" in self.weights:
            blocks["W_proj"] = ("proj", cache.o * cache.tc)
        return blocks

    def _state_vjp_parts(self, cache: LSTMCache, v: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """v · J by columns: each gate's term δ_p W_hp of the h-columns, and the c-columns v_c' ⊙ f."""
        gates, v_new_c = self._adjoints(cache, v)
        return {g: gates[g] @ self.weights[f"W_h{g}"] for g in GATES}, v_new_c * cache.f

    def path_vjps(self, cache: LSTMCache, v: Tensor) -> dict[str, Tensor]:
        """v · P_p from :meth:`_state_vjp_parts`: carry v_c' ⊙ f on the c-columns; forget, input, candidate and
        output δ_p W_hp (p = f, i, g, o) on the h-columns."""
        through_gates, carried = self._state_vjp_parts(cache, v)
        vjps = {"carry": torch.nn.functional.pad(carried, (self.output_size, 0))}
        return vjps | {
            path: torch.nn.functional.pad(through_gates[gate], (0, self.hidden_size))
            for path, gate in PATH_GATES.items()
        }

    @property
    def covector_elements(self) -> int:
        """Closed forms (:func:`closed_form_elements`); with a projection input_energies forms ∂s'/∂x (its c-rows, the
        rows of ∂m/∂x and their projection: at most 4 S × I)."""
        formed = 4 * self.state_size * self.input_size if "W_proj" in self.weights else 0
        return closed_form_elements(self) + formed

    @property
    def energies_need_rows(self) -> bool:
        """With a projection the covectors above reach the gates through W_proj: their rows are needed."""
        return "W_proj" in self.weights

    def param_energies(self, cache: LSTMCache, above: Covectors | None = None) -> dict[str, FactorEnergy]:
        """With q = o ⊙ φ'(c') and μ = :meth:`_output_energies`, the gates' adjoints δ_p = v_c' ⊙ d_p
        (:meth:`_gate_gains`, v_c' = v_c + v_m ⊙ q) sum to Σ_k d_{p,k}² (1 + q_k² μ_k): the one-hots e_{c_k} give the 1,
        the covectors on h the rest, and no covector has both an h- and a c-part, so there are no cross terms. The
        output gate's v_m ⊙ d_o sums to Σ_k d_{o,k}² μ_k, W_proj's v_h to P + Σ_j ‖w_j‖² over the rows above. O(H)
        per step and sequence (O(J·P·H) with a projection and J rows above)."""
        gains, mu = self._gate_gains(cache), self._output_energies(above)
        through_c = 1 + (cache.o * cache.dtc).to(wide_dtype(cache.o.dtype)).square() * mu
        energies = {gate: unit_energy(gain, mu if gate == "o" else through_c) for gate, gain in gains.items()}
        if "W_proj" in self.weights:
            covered = energies["o"].new_full(energies["o"].shape, float(self.output_size))  # the one-hots on h
            energies["proj"] = covered if above is None else covered + above.energies.sum(-1)
        return {block: FactorEnergy(energies[adjoint], u) for block, (adjoint, u) in self._block_inputs(cache).items()}

    def _output_energies(self, above: Covectors | None) -> Tensor | float:
        """μ_k = Σ_j (w_j Π)_k² over the h-parts of the covectors: the one-hots on h give ‖Π[:, k]‖² (1 without a
        projection) and the rows R above ‖(R Π)[:, k]‖² (their column energies without one)."""
        if "W_proj" not in self.weights:
            return covector_weights(above)
        projection = self.weights["W_proj"]
        mu = square_sum(projection, dims=(0,))
        return mu if above is None else mu + square_sum(covector_rows(above, self.kind) @ projection, dims=(-2,))

    def input_energies(self, cache: LSTMCache) -> Tensor:
        """Without a projection ∂s'/∂x has c-rows C = Σ_p diag(d_p) W_ip (p = f, i, g) and h-rows
        diag(q) C + diag(d_o) W_io (:meth:`_gate_gains`, q = o ⊙ φ'(c')), both sums of diag-scaled blocks whose squared
        column norms :func:`scaled_sum_energies` forms in O(H·I) per step and sequence. With one, the h-rows pass
        through W_proj and ∂s'/∂x is formed."""
        if "W_proj" in self.weights:
            return super().input_energies(cache)
        gains, q = self._gate_gains(cache), cache.o * cache.dtc
        c_rows = [(gains[gate], self.weights[f"W_i{gate}"]) for gate in "fig"]
        h_rows = [(q * gain, weight) for gain, weight in c_rows] + [(gains["o"], self.weights["W_io"])]
        return scaled_sum_energies(c_rows) + scaled_sum_energies(h_rows)
