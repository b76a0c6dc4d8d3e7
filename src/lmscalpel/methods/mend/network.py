"""The MEND editor network: maps each token's (u, δ) to (ũ, δ̃) and turns them into ΔW.

Mitchell et al. 2022, "Fast Model Editing at Scale" (§3.1-3.2). For an edited matrix W (out, in)
whose gradient is Σ_t δ_t u_tᵀ (see :mod:`.grads`), the editor computes

    z_t = standardise([u_t ; δ_t])                              (d_in + d_out,)
    h_t = relu(s_ℓ ⊙ (A z_t + a) + o_ℓ)                         (rank,)   low-rank hidden layer
    [ũ_t ; δ̃_t] = z_t + B h_t + b                               B, b start at zero: identity
    ΔW = -η_ℓ Σ_t δ̃_t ũ_tᵀ                                      (out, in), rank <= #tokens

With ``precondition`` the input-side factor is C_ℓ⁻¹ ũ_t instead (ũ_t taken back to the input's
scale), C_ℓ the second moment of the matrix's inputs over text: the untrained editor then steps
along C⁻¹u like ROME's rank-one update (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", eq. 2), which changes the outputs of keys that are common in text least —
on CounterFact, the prompts that share the edit's relation.

One :class:`GradientTransform` (A, a, B, b) serves every edited matrix of the same shape; the
per-matrix scale ``s_ℓ`` and shift ``o_ℓ`` (MEND's layer-specific modulation) and the learned step
size ``η_ℓ`` tell them apart. The standardisation statistics (mean, std of [u; δ] per matrix) are
measured once on training edits before meta-training (:meth:`MENDNetwork.calibrate`) and then
fixed, so an untrained network is a well-scaled, preconditioned gradient step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lmscalpel.methods.mend.grads import TokenGrads

LowRank = tuple[torch.Tensor, torch.Tensor]  # left (E, out, T), right (E, T, in)


def shape_key(shape: Sequence[int]) -> str:
    """Name of the transform shared by matrices of ``shape`` (out, in)."""
    return f"{shape[0]}x{shape[1]}"


class GradientTransform(nn.Module):
    """One low-rank MLP over the concatenated token pair z = [u; δ] of matrices of one shape.

    ``forward(u (n, d_in), delta (n, d_out), mode)`` returns (ũ (n, d_in), δ̃ (n, d_out)); ``mode``
    indexes the matrix (its statistics, scale and shift). It is the identity on standardised
    inputs until trained.
    """

    def __init__(
        self, d_in: int, d_out: int, n_modes: int, rank: int, precondition: bool = False
    ) -> None:
        super().__init__()
        width = d_in + d_out
        self.d_in, self.d_out = d_in, d_out
        self.register_buffer("mean", torch.zeros(n_modes, width))
        self.register_buffer("std", torch.ones(n_modes, width))
        self.precondition = precondition
        if precondition:  # per matrix: (C + ridge)⁻¹ of its inputs, see MENDNetwork
            self.register_buffer("key_inverse", torch.eye(d_in).repeat(n_modes, 1, 1))
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = nn.Parameter(torch.ones(n_modes, rank))
        self.shift = nn.Parameter(torch.zeros(n_modes, rank))

    def standardise(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> torch.Tensor:
        return (torch.cat([u, delta], dim=-1) - self.mean[mode]) / self.std[mode]

    def forward(
        self, u: torch.Tensor, delta: torch.Tensor, mode: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.standardise(u, delta, mode)
        hidden = torch.relu(self.scale[mode] * self.down(z) + self.shift[mode])
        out = z + self.up(hidden)
        return out[..., : self.d_in], out[..., self.d_in :]

    def right_factor(self, u_new: torch.Tensor, mode: int) -> torch.Tensor:
        """The input-side factor of ΔW from the transformed ũ: ũ itself (standardised
        coordinates), or, preconditioned, C⁻¹ applied to ũ taken back to the input's scale — so
        that the untrained editor's update is along C⁻¹u, ROME's direction."""
        if not self.precondition:
            return u_new
        u_scale = u_new * self.std[mode, : self.d_in] + self.mean[mode, : self.d_in]
        return u_scale @ self.key_inverse[mode]


class MENDNetwork(nn.Module):
    """The editor for a fixed set of weight matrices of one base model.

    ``shapes``: weight name -> (out, in). ``rank``: width of each transform's hidden layer.
    ``step``: initial step size η of every matrix (learned in log space).
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        rank: int,
        step: float = 1e-4,
        precondition: bool = False,
    ) -> None:
        super().__init__()
        self.precondition = bool(precondition)
        if not shapes:
            raise ValueError("a MEND network needs at least one matrix to edit")
        self.shapes = {name: (int(s[0]), int(s[1])) for name, s in shapes.items()}
        self.rank = int(rank)
        groups: dict[str, list[str]] = {}
        for name, shape in self.shapes.items():
            groups.setdefault(shape_key(shape), []).append(name)
        self.modes = {
            name: (key, index) for key, names in groups.items() for index, name in enumerate(names)
        }
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(
                    self.shapes[names[0]][1],
                    self.shapes[names[0]][0],
                    len(names),
                    rank,
                    self.precondition,
                )
                for key, names in groups.items()
            }
        )
        self.log_step = nn.Parameter(torch.full((len(self.shapes),), math.log(step)))

    @property
    def parameter_names(self) -> list[str]:
        return list(self.shapes)

    def step_sizes(self) -> dict[str, float]:
        """Current η of each matrix."""
        return {n: float(s) for n, s in zip(self.shapes, self.log_step.detach().exp())}

    def transform(
        self, name: str, u: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key, mode = self.modes[name]
        return self.transforms[key](u, delta, mode)

    def factors(self, grads: TokenGrads, step_scale: float = 1.0) -> dict[str, LowRank]:
        """Per-edit low-rank updates: name -> (left (E, out, T), right (E, T, in)) with
        ΔW_e = left[e] @ right[e] = -η Σ_t δ̃_{e,t} ũ_{e,t}ᵀ (padding tokens contribute zero)."""
        mask = grads.mask
        idx = mask.nonzero(as_tuple=True)
        out: dict[str, LowRank] = {}
        for i, name in enumerate(self.shapes):
            u = grads.inputs[name]
            d = grads.grads[name]
            u_new, d_new = self.transform(name, u[idx], d[idx])
            key, mode = self.modes[name]
            u_new = self.transforms[key].right_factor(u_new, mode)
            step = self.log_step[i].exp() * step_scale
            right = u.new_zeros(u.shape).index_put(idx, u_new)
            left = d.new_zeros(d.shape).index_put(idx, -step * d_new)
            out[name] = (left.transpose(1, 2), right)
        return out

    @torch.no_grad()
    def calibrate(self, batches: Iterable[TokenGrads]) -> int:
        """Set each matrix's standardisation statistics from the real tokens of ``batches``.

        Returns the number of tokens used. Dimensions that (almost) never vary get std 1.
        """
        sums: dict[str, torch.Tensor] = {}
        squares: dict[str, torch.Tensor] = {}
        count = 0
        for grads in batches:
            idx = grads.mask.nonzero(as_tuple=True)
            count += len(idx[0])
            for name in self.shapes:
                z = torch.cat([grads.inputs[name][idx], grads.grads[name][idx]], dim=-1).double()
                sums[name] = sums.get(name, 0) + z.sum(0)
                squares[name] = squares.get(name, 0) + (z * z).sum(0)
        if count < 2:
            raise ValueError("calibration needs at least two tokens")
        for name in self.shapes:
            key, mode = self.modes[name]
            mean = sums[name] / count
            var = (squares[name] / count - mean * mean).clamp(min=0) * count / (count - 1)
            transform = self.transforms[key]
            std = var.sqrt()
            for part in (slice(0, transform.d_in), slice(transform.d_in, None)):
                # u and δ live on very different scales: floor each part by its own largest std.
                piece = std[part]
                floor = 1e-6 * float(piece.max())
                std[part] = torch.where(piece > floor, piece, torch.ones_like(piece))
            transform.mean[mode] = mean.to(transform.mean.dtype)
            transform.std[mode] = std.to(transform.std.dtype)
        return count

    @torch.no_grad()
    def set_key_statistics(self, moments: dict[str, torch.Tensor], ridge: float) -> None:
        """Preconditioned editors: store each matrix's (C + ridge · mean diag(C) · I)⁻¹, C the
        second moment of its inputs (:func:`lmscalpel.mechanics.stats.input_statistics`), times
        mean diag(C) so that it is dimensionless (the identity for C = σ²I)."""
        if not self.precondition:
            raise ValueError("this editor was built without preconditioning")
        for name in self.shapes:
            moment = moments[name].double()
            scale = moment.diagonal().mean()
            eye = torch.eye(len(moment), dtype=moment.dtype)
            inverse = torch.linalg.inv(moment + ridge * scale * eye) * scale
            key, mode = self.modes[name]
            transform = self.transforms[key]
            transform.key_inverse[mode] = inverse.to(transform.key_inverse.dtype)

    def set_step(self, step: float) -> None:
        """Give every matrix the step size ``step``."""
        with torch.no_grad():
            self.log_step.fill_(math.log(step))
