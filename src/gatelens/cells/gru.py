"""The GRU cell in every convention in use.

With σ the gate activation and φ the candidate activation (tanh unless stated):

    r  = σ(W_ir x + b_ir + W_hr h + b_hr)                         reset gate
    z  = σ(W_iz x + b_iz + W_hz h + b_hz)                         update gate
    reset "after"  (PyTorch, cuDNN, Keras reset_after=True, ONNX linear_before_reset=1):
        n = φ(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    reset "before" (Cho et al. 2014 v3, Keras reset_after=False, ONNX linear_before_reset=0):
        n = φ(W_in x + b_in + W_hn (r ⊙ h) + b_hn)
    h' = c ⊙ h + (1 − c) ⊙ n,   with the carry gate  c = z (update "keep": PyTorch, Keras, ONNX, Cho)
                                                     c = 1 − z (update "replace": Chung et al. 2014)

The two shares c and 1 − c are z and 1 − z as the formula writes them, with 1 − z = σ(−a_z) computed from the
pre-activation (``gatelens.activations``), never as 1 − z from z or as 1 − c from c: a share below the dtype's eps
would otherwise round away (1 − (1 − z) = 0 under update "replace"; 1 − σ(a_z) = 0 once σ(a_z) rounds to 1 under
"keep"), and that is exactly the long-memory regime of each convention. So gatelens is exact there where a plain
forward pass (torch's own GRU included) rounds the kept state's complement to 0.

Writing c' = ∂c/∂a_z = ±σ'(a_z) and g = (1 − c) ⊙ φ'(a_n), the Jacobian ∂h'/∂h is the sum of four paths:

    carry      diag(c)
    update     diag((h − n) ⊙ c') W_hz
    candidate  after:  diag(g ⊙ r) W_hn                 before: diag(g) W_hn diag(r)
    reset      after:  diag(g ⊙ u ⊙ σ'(a_r)) W_hr       before: diag(g) W_hn diag(h ⊙ σ'(a_r)) W_hr
               where u = W_hn h + b_hn

and the input Jacobian is diag((h − n) ⊙ c') W_iz + diag(g) W_in + (the reset path with W_ir for W_hr).

Forward products follow the chain rule through the pre-activations, never forming J: with ȧ_r, ȧ_z the tangents of
a_r, a_z and ȧ_n that of a_n,

    J v      = c ⊙ v + (h − n) ⊙ c' ⊙ (W_hz v) + g ⊙ ȧ_n,     ȧ_r = W_hr v
    ∂h'/∂x v = (h − n) ⊙ c' ⊙ (W_iz v) + g ⊙ (W_in v + ȧ_n),  ȧ_r = W_ir v
    ȧ_n      after:  r ⊙ (W_hn v) + u ⊙ σ'(a_r) ⊙ ȧ_r       before:  W_hn (r ⊙ v + h ⊙ σ'(a_r) ⊙ ȧ_r)

(the input product has no r ⊙ (W_hn v) and no r ⊙ v), so reset "after" gives J v = c ⊙ v + Σ_p scale_p ⊙ (W_p v) over
the update, candidate and reset paths. ‖J‖_F: exact for reset "after" (each row is d_i e_i + Σ_p s_{p,i} W_p[i, :],
whose norm comes from the Gram matrix of the rows W_p[i, :]); bounded for "before" (see jacobian_norm_bounds).

Local gradients sum the adjoints of the one-hot covectors e_j on h'. Every pre-activation adjoint but reset
"before"'s δ_r is v ⊙ d with a gain per unit: d_z = (h − n) ⊙ c', d_n = g, d_hn = g ⊙ r (after) or g (before),
d_r = g ⊙ u ⊙ σ'(a_r) (after); so Σ_j ‖δ(e_j)‖² = Σ_i d_i², and for reset "before"
Σ_j ‖δ_r(e_j)‖² = (g²)ᵀ (W_hn ∘ W_hn) (h ⊙ σ'(a_r))².
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
    check_choice,
    closed_form_elements,
    covector_product,
    covector_rows,
    covector_weights,
    diag_times,
    forms_for,
    gate_values,
    perturbed_norm_bounds,
    row_norm_bounds,
    row_norms,
    scaled_sum,
    scaled_sum_energies,
    sizing_block,
    spectral_norm,
    square_sum,
    uniform_weights,
    unit_energy,
    wide_dtype,
)

RESET_PLACEMENTS = ("after", "before")
UPDATE_CONVENTIONS = ("keep", "replace")
GATES = ("r", "z", "n")


@dataclass(frozen=True)
class GRUCache:
    """Gates of one or many GRU steps; every field has shape (..., B, H) except x (..., B, I)."""

    x: Tensor
    h: Tensor  # the previous state
    r: Tensor
    z: Tensor
    z_complement: Tensor  # 1 − z, formed as σ(−a_z)
    n: Tensor
    dr: Tensor  # σ'(a_r)
    dz: Tensor  # σ'(a_z)
    dn: Tensor  # φ'(a_n)
    u: Tensor  # the input of φ's recurrent term before the reset: W_hn h + b_hn (after) or r ⊙ h (before)


@dataclass(frozen=True, eq=False, repr=False)
class GRU(Cell):
    """A GRU cell in one of the four conventions (see the module docstring for the equations).

    ``weights`` maps canonical block names to tensors: W_ir, W_iz, W_in (H, I); W_hr, W_hz, W_hn (H, H);
    optionally all six biases b_ir, b_iz, b_in, b_hr, b_hz, b_hn (H,), or none of them.
    """

    weights: Mapping[str, Tensor]
    reset: str = "after"
    update: str = "keep"
    gate: str = "sigmoid"
    candidate: str = "tanh"
    kind = "GRU"
    gate_names = ("r", "z")
    _gate: Activation = field(init=False, repr=False)
    _candidate: Activation = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("reset placement", self.reset, RESET_PLACEMENTS)
        check_choice("update convention", self.update, UPDATE_CONVENTIONS)
        self._adopt_gated_activations()
        hidden, inputs = sizing_block("GRU", self.weights, "W_iz")
        required, optional = self.block_shapes(inputs, hidden)
        self._adopt_weights(
            required, optional, input_size=inputs, hidden_size=hidden, output_size=hidden, state_size=hidden
        )

    @staticmethod
    def block_shapes(input_size: int, hidden_size: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int]]]:
        """Expected shapes of the weight blocks (required) and of the biases (optional)."""
        required = {f"W_i{g}": (hidden_size, input_size) for g in GATES}
        required |= {f"W_h{g}": (hidden_size, hidden_size) for g in GATES}
        optional = {f"b_{side}{g}": (hidden_size,) for side in "ih" for g in GATES}
        return required, optional

    @classmethod
    def random(
        cls,
        input_size: int,
        hidden_size: int,
        *,
        reset: str = "after",
        update: str = "keep",
        gate: str = "sigmoid",
        candidate: str = "tanh",
        bias: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> GRU:
        """A GRU with PyTorch's default initialisation U(−1/√H, 1/√H), reproducible from ``seed``."""
        required, optional = cls.block_shapes(input_size, hidden_size)
        shapes = required | optional if bias else required
        weights = uniform_weights(shapes, hidden_size, seed, dtype)
        return cls(weights, reset=reset, update=update, gate=gate, candidate=candidate)

    @property
    def path_names(self) -> tuple[str, ...]:
        return ("carry", "update", "candidate", "reset")

    def step(self, x: Tensor, state: Tensor, clamp: Clamp | None = None) -> tuple[Tensor, GRUCache]:
        w, b = self.weights, self.weights.get
        h = state
        a_r = affine(x, w["W_ir"], b("b_ir")) + affine(h, w["W_hr"], b("b_hr"))
        a_z = affine(x, w["W_iz"], b("b_iz")) + affine(h, w["W_hz"], b("b_hz"))
        r, _, dr = gate_values(self._gate, "r", a_r, clamp)
        z, z_complement, dz = gate_values(self._gate, "z", a_z, clamp)
        if self.reset == "after":
            u = affine(h, w["W_hn"], b("b_hn"))
            a_n = affine(x, w["W_in"], b("b_in")) + r * u
        else:
            u = r * h
            a_n = affine(x, w["W_in"], b("b_in")) + affine(u, w["W_hn"], b("b_hn"))
        n = self._candidate.function(a_n)
        dn = self._candidate.derivative(a_n, n)
        cache = GRUCache(x=x, h=h, r=r, z=z, z_complement=z_complement, n=n, dr=dr, dz=dz, dn=dn, u=u)
        carry, renew = self._shares(cache)
        new_h = carry * h + renew * n
        return new_h, cache

    def memory_gates(self, cache: GRUCache) -> MemoryGates:
        """carry c, gate r, and admit r (reset "after") or ‖W_hn[j, :] ⊙ r‖ / ‖W_hn[j, :]‖ (reset "before")."""
        carry, renew = self._shares(cache)
        if self.reset == "after":
            return MemoryGates(carry=carry, admit=cache.r, gate=cache.r, leak=renew)
        squared = self.weights["W_hn"].square()
        row = squared.sum(-1)
        admitted = (cache.r.square() @ squared.T).sqrt()
        admit = torch.where(row > 0, admitted / row.sqrt().clamp_min(torch.finfo(row.dtype).tiny), 0.0)
        return MemoryGates(carry=carry, admit=admit, gate=cache.r, leak=renew)

    def _shares(self, cache: GRUCache) -> tuple[Tensor, Tensor]:
        """(c, 1 − c): the shares of the old state and of the candidate, (z, 1 − z) for "keep", (1 − z, z) for
        "replace", with 1 − z = σ(−a_z) from the cache (module docstring)."""
        return (cache.z, cache.z_complement) if self.update == "keep" else (cache.z_complement, cache.z)

    def _carry(self, cache: GRUCache) -> Tensor:
        """c: the share of the old state kept, z ("keep") or 1 − z ("replace")."""
        return self._shares(cache)[0]

    def _carry_slope(self, cache: GRUCache) -> Tensor:
        """c' = ∂c/∂a_z."""
        return cache.dz if self.update == "keep" else -cache.dz

    def _update_scale(self, cache: GRUCache) -> Tensor:
        """∂h'/∂a_z = (h − n) ⊙ c'."""
        return (cache.h - cache.n) * self._carry_slope(cache)

    def _candidate_gain(self, cache: GRUCache) -> Tensor:
        """g = ∂h'/∂a_n = (1 − c) ⊙ φ'(a_n)."""
        return self._shares(cache)[1] * cache.dn

    def _scaled_blocks(self, cache: GRUCache) -> dict[str, tuple[Tensor, str]]:
        """The update path, and for reset "after" the candidate and reset paths, as diag(scale) · W_block."""
        blocks = {"update": (self._update_scale(cache), "W_hz")}
        if self.reset == "after":
            gain = self._candidate_gain(cache)
            blocks |= {"candidate": (gain * cache.r, "W_hn"), "reset": (gain * cache.u * cache.dr, "W_hr")}
        return blocks

    def jacobian_paths(self, cache: GRUCache) -> dict[str, Tensor]:
        w = self.weights
        paths = {"carry": torch.diag_embed(self._carry(cache))}
        paths |= {name: diag_times(scale, w[block]) for name, (scale, block) in self._scaled_blocks(cache).items()}
        if self.reset == "before":
            gain_w_hn = diag_times(self._candidate_gain(cache), w["W_hn"])  # diag(g) W_hn, shared by both paths
            paths["candidate"] = gain_w_hn * cache.r.unsqueeze(-2)
            paths["reset"] = (gain_w_hn * (cache.h * cache.dr).unsqueeze(-2)) @ w["W_hr"]
        return paths

    def jacobian(self, cache: GRUCache) -> Tensor:
        """For reset "after", J = diag(c) + Σ_p diag(scale_p) W_p in one contraction, without forming the paths."""
        if self.reset == "before":
            return super().jacobian(cache)
        blocks = self._scaled_blocks(cache).values()
        jacobian = scaled_sum([scale for scale, _ in blocks], [self.weights[block] for _, block in blocks])
        jacobian.diagonal(dim1=-2, dim2=-1).add_(self._carry(cache))
        return jacobian

    def input_jacobian(self, cache: GRUCache) -> Tensor:
        """diag((h − n) ⊙ c') W_iz + diag(g) W_in + the reset path: diag(g ⊙ u ⊙ σ'(a_r)) W_ir (reset "after", all
        three in one contraction) or diag(g) W_hn diag(h ⊙ σ'(a_r)) W_ir ("before")."""
        w = self.weights
        gain = self._candidate_gain(cache)
        if self.reset == "after":
            scales = [self._update_scale(cache), gain, gain * cache.u * cache.dr]
            return scaled_sum(scales, [w["W_iz"], w["W_in"], w["W_ir"]])
        through_reset = (diag_times(gain, w["W_hn"]) * (cache.h * cache.dr).unsqueeze(-2)) @ w["W_ir"]
        return diag_times(self._update_scale(cache), w["W_iz"]) + diag_times(gain, w["W_in"]) + through_reset

    def _adjoint_gains(self, cache: GRUCache) -> dict[str, Tensor]:
        """The gain d of every pre-activation adjoint v ⊙ d that acts on each unit alone: z (h − n) ⊙ c', n g, hn g ⊙ r
        (a_n = … + r ⊙ (W_hn h + b_hn)) or g (reset "before"), and for reset "after" r g ⊙ u ⊙ σ'(a_r)."""
        gain = self._candidate_gain(cache)
        gains = {"z": self._update_scale(cache), "n": gain, "hn": gain}
        if self.reset == "after":
            blocks = self._scaled_blocks(cache)
            gains |= {"hn": blocks["candidate"][0], "r": blocks["reset"][0]}
        return gains

    def _preactivation_adjoints(self, cache: GRUCache, v: Tensor) -> dict[str, Tensor]:
        """Adjoints of v at a_r, a_z, a_n and at the output of W_hn's product ("hn"): v ⊙ d (:meth:`_adjoint_gains`),
        and for reset "before" δ_r = ((v ⊙ g) W_hn) ⊙ h ⊙ σ'(a_r) (a_n = … + W_hn (r ⊙ h) + b_hn)."""
        g = {name: v * gain for name, gain in self._adjoint_gains(cache).items()}
        if self.reset == "before":
            g["r"] = (g["n"] @ self.weights["W_hn"]) * cache.h * cache.dr
        return g

    def state_vjp(self, cache: GRUCache, v: Tensor) -> Tensor:
        """v · J, the sum of :meth:`path_vjps` (3 products with H × H blocks per covector); for reset "after" and many
        covectors per sequence (:func:`forms_for`), v · J through J formed once (one H × H product per covector)."""
        if self.reset == "after" and forms_for(cache, v):
            return covector_product(v, self.jacobian(cache))
        return sum(self.path_vjps(cache, v).values())  # type: ignore[return-value]

    def input_vjp(self, cache: GRUCache, v: Tensor) -> Tensor:
        """v · ∂h'/∂x: δ_r W_ir + δ_z W_iz + δ_n W_in, or for reset "after" and many covectors per sequence
        (:func:`forms_for`) through ∂h'/∂x formed once."""
        if self.reset == "after" and forms_for(cache, v):
            return covector_product(v, self.input_jacobian(cache))
        w = self.weights
        g = self._preactivation_adjoints(cache, v)
        return g["r"] @ w["W_ir"] + g["z"] @ w["W_iz"] + g["n"] @ w["W_in"]

    def _candidate_tangent(self, cache: GRUCache, tangent_r: Tensor, v: Tensor | None = None) -> Tensor:
        """ȧ_n less W_in's term, from ȧ_r and a state tangent v (None for an input tangent): r ⊙ (W_hn v) +
        u ⊙ σ'(a_r) ⊙ ȧ_r (reset "after"), W_hn (r ⊙ v + h ⊙ σ'(a_r) ⊙ ȧ_r) (reset "before")."""
        w_hn = self.weights["W_hn"]
        if self.reset == "after":
            through_r = cache.u * cache.dr * tangent_r
            return through_r if v is None else through_r + cache.r * affine(v, w_hn, None)
        through_r = cache.h * cache.dr * tangent_r
        return affine(through_r if v is None else through_r + cache.r * v, w_hn, None)

    def _new_state_tangent(self, cache: GRUCache, tangent_z: Tensor, tangent_n: Tensor) -> Tensor:
        """The tangent of h' from those of a_z and a_n (the carry term c ⊙ v aside): (h − n) ⊙ c' ⊙ ȧ_z + g ⊙ ȧ_n."""
        return self._update_scale(cache) * tangent_z + self._candidate_gain(cache) * tangent_n

    def state_jvp(self, cache: GRUCache, v: Tensor) -> Tensor:
        """J v = c ⊙ v + (h − n) ⊙ c' ⊙ (W_hz v) + g ⊙ ȧ_n with ȧ_r = W_hr v (module docstring)."""
        w = self.weights
        tangent_n = self._candidate_tangent(cache, affine(v, w["W_hr"], None), v)
        return self._carry(cache) * v + self._new_state_tangent(cache, affine(v, w["W_hz"], None), tangent_n)

    def input_jvp(self, cache: GRUCache, v: Tensor) -> Tensor:
        """∂h'/∂x v = (h − n) ⊙ c' ⊙ (W_iz v) + g ⊙ (W_in v + ȧ_n) with ȧ_r = W_ir v (module docstring)."""
        w = self.weights
        tangent_n = affine(v, w["W_in"], None) + self._candidate_tangent(cache, affine(v, w["W_ir"], None))
        return self._new_state_tangent(cache, affine(v, w["W_iz"], None), tangent_n)

    def _masked_hn_row_norms(self, scale: Tensor) -> Tensor:
        """‖W_hn[i, :] ⊙ scale‖ for every row i: √((W_hn ⊙ W_hn) scale²), shape (..., H)."""
        return affine(scale.square(), self.weights["W_hn"].square(), None).sqrt()

    def jacobian_norm_bounds(self, cache: GRUCache) -> NormBounds:
        """Reset "after": ‖J‖_F itself, from the rows of diag(c) + Σ_p diag(scale_p) W_p (:func:`row_norms`).

        Reset "before": the rows a_i of diag(c) + diag((h − n) ⊙ c') W_hz exactly, and those of the candidate and reset
        paths, g_i W_hn[i, :] (diag(r) + diag(h ⊙ σ'(a_r)) W_hr), bounded by
        b_i = |g_i| (‖W_hn[i, :] ⊙ r‖ + ‖W_hn[i, :] ⊙ h ⊙ σ'(a_r)‖ ‖W_hr‖₂) (:func:`perturbed_norm_bounds`).
        """
        blocks = self._scaled_blocks(cache).values()
        rows = row_norms([scale for scale, _ in blocks], [self.weights[b] for _, b in blocks], self._carry(cache))
        if self.reset == "after":
            norm = torch.linalg.vector_norm(rows, dim=-1)
            return NormBounds(norm, norm)
        return perturbed_norm_bounds(rows, self._unformed_spread(cache))

    def jacobian_row_bounds(self, cache: GRUCache) -> NormBounds:
        """The rows of :meth:`jacobian_norm_bounds`, with their rounding (:func:`row_norm_bounds`): the rows of
        diag(c) + Σ_p diag(scale_p) W_p, and for reset "before" the spread b_i of the candidate and reset paths."""
        blocks = self._scaled_blocks(cache).values()
        scales, weights = [scale for scale, _ in blocks], [self.weights[b] for _, b in blocks]
        spread = None if self.reset == "after" else self._unformed_spread(cache)
        return row_norm_bounds(scales, weights, self._carry(cache), spread)

    def _unformed_spread(self, cache: GRUCache) -> Tensor:
        """b_i ≥ ‖g_i W_hn[i, :] (diag(r) + diag(h ⊙ σ'(a_r)) W_hr)‖ for reset "before"."""
        through_reset = self._masked_hn_row_norms(cache.h * cache.dr) * spectral_norm(self.weights["W_hr"])
        return self._candidate_gain(cache).abs() * (self._masked_hn_row_norms(cache.r) + through_reset)

    def input_jacobian_row_bounds(self, cache: GRUCache) -> Tensor:
        """Upper bounds on the rows of ∂h'/∂x (:meth:`input_jacobian_norm_bound`), rounding included."""
        scales, weights, spread = self._input_rows(cache)
        return row_norm_bounds(scales, weights, spread=spread).upper

    def _input_rows(self, cache: GRUCache) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """∂h'/∂x = Σ_p diag(s_p) W_p + E: the scales s_p, the blocks W_p and (reset "before") the bound b_i ≥
        ‖E[i, :]‖ on the reset path g_i (W_hn[i, :] ⊙ h ⊙ σ'(a_r)) W_ir."""
        w = self.weights
        gain = self._candidate_gain(cache)
        paths = [(self._update_scale(cache), "W_iz"), (gain, "W_in")]
        spread = None
        if self.reset == "after":
            paths.append((gain * cache.u * cache.dr, "W_ir"))
        else:
            spread = gain.abs() * self._masked_hn_row_norms(cache.h * cache.dr) * spectral_norm(w["W_ir"])
        return [scale for scale, _ in paths], [w[block] for _, block in paths], spread

    def input_jacobian_norm_bound(self, cache: GRUCache) -> Tensor:
        """‖∂h'/∂x‖_F from the rows of diag((h − n) ⊙ c') W_iz + diag(g) W_in + the reset path: exact for reset
        "after" (diag(g ⊙ u ⊙ σ'(a_r)) W_ir joins the rows); for "before", the reset path's rows
        g_i (W_hn[i, :] ⊙ h ⊙ σ'(a_r)) W_ir are bounded by |g_i| ‖W_hn[i, :] ⊙ h ⊙ σ'(a_r)‖ ‖W_ir‖₂."""
        scales, weights, spread = self._input_rows(cache)
        rows = row_norms(scales, weights)
        if spread is None:
            return torch.linalg.vector_norm(rows, dim=-1)
        return perturbed_norm_bounds(rows, spread).upper

    def param_factors(self, cache: GRUCache, v: Tensor) -> dict[str, Factor]:
        g = self._preactivation_adjoints(cache, v)
        return {block: Factor(g[adjoint], inputs) for block, (adjoint, inputs) in self._block_inputs(cache).items()}

    def _block_inputs(self, cache: GRUCache) -> dict[str, tuple[str, Tensor | None]]:
        """Each weight block's pre-activation adjoint (r, z, n or hn) and input u (None for a bias)."""
        blocks: dict[str, tuple[str, Tensor | None]] = {f"W_i{gate}": (gate, cache.x) for gate in GATES}
        blocks |= {"W_hr": ("r", cache.h), "W_hz": ("z", cache.h)}
        blocks["W_hn"] = ("hn", cache.u if self.reset == "before" else cache.h)
        if "b_ir" in self.weights:
            blocks |= {f"b_i{gate}": (gate, None) for gate in GATES}
            blocks |= {"b_hr": ("r", None), "b_hz": ("z", None), "b_hn": ("hn", None)}
        return blocks

    def path_vjps(self, cache: GRUCache, v: Tensor) -> dict[str, Tensor]:
        """v · P_p without forming P_p, from the adjoints δ of :meth:`_preactivation_adjoints`: carry c ⊙ v, update
        δ_z W_hz, candidate δ_hn W_hn (reset "after") or (δ_hn W_hn) ⊙ r ("before"), reset δ_r W_hr."""
        w = self.weights
        g = self._preactivation_adjoints(cache, v)
        candidate = g["hn"] @ w["W_hn"]
        return {
            "carry": v * self._carry(cache),
            "update": g["z"] @ w["W_hz"],
            "candidate": candidate * cache.r if self.reset == "before" else candidate,
            "reset": g["r"] @ w["W_hr"],
        }

    @property
    def covector_elements(self) -> int:
        """Closed forms (:func:`closed_form_elements`); reset "before" forms ∂h'/∂x in input_energies, through
        diag(g) W_hn diag(h ⊙ σ'(a_r)) (H × H, then H × I)."""
        formed = self.state_size * (self.state_size + self.input_size) if self.reset == "before" else 0
        return closed_form_elements(self) + formed

    @property
    def energies_need_rows(self) -> bool:
        """Reset "before" mixes units in δ_r, whose sum over covectors needs their rows (:meth:`_reset_energy`)."""
        return self.reset == "before"

    def param_energies(self, cache: GRUCache, above: Covectors | None = None) -> dict[str, FactorEnergy]:
        """Every adjoint v ⊙ d of :meth:`_adjoint_gains` sums to Σ_i d_i² ω_i, with ω_i = 1 + Σ_j w_j[i]² over the rows
        of ``above`` (:func:`unit_energy`); reset "before"'s δ_r as :meth:`_reset_energy` says. O(H) per step and
        sequence, plus O(H²) for reset "before" (O(J·H²) with J rows above)."""
        weights = covector_weights(above)
        energies = {name: unit_energy(gain, weights) for name, gain in self._adjoint_gains(cache).items()}
        if self.reset == "before":
            energies["r"] = self._reset_energy(cache, above)
        return {block: FactorEnergy(energies[adjoint], u) for block, (adjoint, u) in self._block_inputs(cache).items()}

    def _reset_energy(self, cache: GRUCache, above: Covectors | None) -> Tensor:
        """Reset "before": δ_r = ((v ⊙ g) W_hn) ⊙ h ⊙ σ'(a_r) sums over the one-hots to
        ‖diag(g) W_hn diag(h ⊙ σ'(a_r))‖_F² = (g²)ᵀ (W_hn ∘ W_hn) (h ⊙ σ'(a_r))², and over the rows R above to
        ‖((R ⊙ g) W_hn) ⊙ h ⊙ σ'(a_r)‖_F²."""
        w_hn, gain, slope = self.weights["W_hn"], self._candidate_gain(cache), cache.h * cache.dr
        wide = wide_dtype(slope.dtype)
        energy = unit_energy(gain, affine(slope.to(wide).square(), w_hn.to(wide).square(), None))
        if above is None:
            return energy
        through = (covector_rows(above, self.kind) * gain.unsqueeze(-2)) @ w_hn * slope.unsqueeze(-2)  # (..., J, H)
        return energy + square_sum(through, dims=(-2, -1))

    def input_energies(self, cache: GRUCache) -> Tensor:
        """Reset "after": ∂h'/∂x = Σ_g diag(d_g) W_ig over g = r, z, n with the gains d of :meth:`_adjoint_gains`, whose
        squared column norms :func:`scaled_sum_energies` forms in O(H·I) per step and sequence. Reset "before": the
        reset term mixes units through W_hn, so ∂h'/∂x is formed (O(H²·I))."""
        if self.reset == "before":
            return super().input_energies(cache)
        gains = self._adjoint_gains(cache)
        return scaled_sum_energies([(gains[gate], self.weights[f"W_i{gate}"]) for gate in GATES])
