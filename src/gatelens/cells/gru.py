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
    check_choice,
    diag_times,
    gate_values,
    sizing_block,
    uniform_weights,
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

    def _candidate_gain(self, cache: GRUCache) -> Tensor:
        """g = ∂h'/∂a_n = (1 − c) ⊙ φ'(a_n)."""
        return self._shares(cache)[1] * cache.dn

    def _scaled_blocks(self, cache: GRUCache) -> dict[str, tuple[Tensor, str]]:
        """The update path, and for reset "after" the candidate and reset paths, as diag(scale) · W_block."""
        blocks = {"update": ((cache.h - cache.n) * self._carry_slope(cache), "W_hz")}
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
        scales = torch.stack([scale for scale, _ in blocks], dim=-1)  # (..., H, paths)
        weights = torch.stack([self.weights[block] for _, block in blocks])  # (paths, H, H)
        jacobian = torch.einsum("...ip,pij->...ij", scales, weights)
        jacobian.diagonal(dim1=-2, dim2=-1).add_(self._carry(cache))
        return jacobian

    def input_jacobian(self, cache: GRUCache) -> Tensor:
        w = self.weights
        gain = self._candidate_gain(cache)
        through_reset = (
            diag_times(gain * cache.u * cache.dr, w["W_ir"])
            if self.reset == "after"
            else (diag_times(gain, w["W_hn"]) * (cache.h * cache.dr).unsqueeze(-2)) @ w["W_ir"]
        )
        return (
            diag_times((cache.h - cache.n) * self._carry_slope(cache), w["W_iz"])
            + diag_times(gain, w["W_in"])
            + through_reset
        )

    def _preactivation_adjoints(self, cache: GRUCache, v: Tensor) -> dict[str, Tensor]:
        """Adjoints of v at a_r, a_z, a_n and at the output of W_hn's product ("hn")."""
        g_z = v * (cache.h - cache.n) * self._carry_slope(cache)
        g_n = v * self._candidate_gain(cache)
        if self.reset == "after":
            g_hn = g_n * cache.r  # a_n = … + r ⊙ (W_hn h + b_hn)
            g_r = g_n * cache.u * cache.dr
        else:
            g_hn = g_n  # a_n = … + W_hn (r ⊙ h) + b_hn
            g_r = (g_n @ self.weights["W_hn"]) * cache.h * cache.dr
        return {"r": g_r, "z": g_z, "n": g_n, "hn": g_hn}

    def state_vjp(self, cache: GRUCache, v: Tensor) -> Tensor:
        w = self.weights
        g = self._preactivation_adjoints(cache, v)
        through_hn = g["hn"] @ w["W_hn"]
        if self.reset == "before":
            through_hn = through_hn * cache.r
        return v * self._carry(cache) + g["z"] @ w["W_hz"] + g["r"] @ w["W_hr"] + through_hn

    def input_vjp(self, cache: GRUCache, v: Tensor) -> Tensor:
        w = self.weights
        g = self._preactivation_adjoints(cache, v)
        return g["r"] @ w["W_ir"] + g["z"] @ w["W_iz"] + g["n"] @ w["W_in"]

    def param_factors(self, cache: GRUCache, v: Tensor) -> dict[str, Factor]:
        g = self._preactivation_adjoints(cache, v)
        factors = {f"W_i{gate}": Factor(g[gate], cache.x) for gate in GATES}
        factors |= {
            "W_hr": Factor(g["r"], cache.h),
            "W_hz": Factor(g["z"], cache.h),
            "W_hn": Factor(g["hn"], cache.u if self.reset == "before" else cache.h),
        }
        if "b_ir" in self.weights:
            factors |= {f"b_i{gate}": Factor(g[gate], None) for gate in GATES}
            factors |= {"b_hr": Factor(g["r"], None), "b_hz": Factor(g["z"], None), "b_hn": Factor(g["hn"], None)}
        return factors
