"""AlphaEdit: Null-Space Constrained Knowledge Editing for Language Models (Fang, Jiang, Wang, Ma,
Shi, Wang, He and Chua, ICLR 2025, arXiv 2410.02355).

MEMIT (:mod:`lmscalpel.methods.memit`) trades the new keys off against the preserved ones (λC in
its solve), so every update disturbs what the model knew a little, and in lifelong editing the
disturbances of hundreds of updates add up. AlphaEdit removes the trade-off: it projects each
update onto the *null space* of the preserved keys K₀, Δ = Δ̃P with P K₀ ≈ 0, so that
(W + Δ)K₀ = WK₀ and the solve only has to fit the new keys. Per layer, with the new keys K₁ and
residuals R as columns, the earlier edits' keys K_p (sequential editing) and the identity as a
small ridge (the paper's eq. 13):

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹

minimises ‖Δ̃PK₁ − R‖² + ‖Δ̃PK_p‖² + α‖Δ̃P‖²: the new keys map to their residuals, the keys of
earlier edits keep their (already edited) values. Everything else is MEMIT's: the target hidden
states at the top of the layer range, the residual spread over the layers from the lowest up,
keys recomputed after each layer (:func:`~lmscalpel.methods.memit.spread_updates`).

Here:

* P is the projection onto the eigenvectors of C = E[kkᵀ] (:mod:`lmscalpel.mechanics.stats`)
  whose eigenvalues hold together at most ``null_energy`` of E[‖k‖²]
  (:meth:`~lmscalpel.mechanics.stats.KeyStatistics.null_space_projection`); the
  eigendecomposition is computed once per layer and cached beside the statistics. The paper
  keeps eigenvalues below an absolute threshold (10⁻²); on the embedded model C has no
  eigenvalue below 0.0022 (its spectrum is flat: docs/alphaedit.md), so a share of the energy,
  which means the same on every model, replaces it.
* α is ``ridge`` times E[‖Pk‖²] = tr(PC), the energy a typical key has in the null space (the
  scale of what the solve fits), so it means the same at any width and key scale. The default 1
  (as much as one typical key) costs one case of ES in 40 and keeps the neighbourhood far better
  than a near-exact fit (docs/alphaedit.md).
* Float64, one :func:`torch.linalg.solve` per layer (:func:`null_space_update`), no inverse; it
  is solved in the null space's r coordinates (r × r, the same matrix as the paper's d_k × d_k
  form), about 7× less arithmetic on the embedded model.

**Sequential editing.** Each patch stores the keys it wrote, per layer, as extra tensors
(``keys.<layer>``, (N, d_k) float32) and their digest in ``info["alphaedit"]``. Plain
:meth:`AlphaEdit.compute` starts a fresh sequence (no earlier keys: MEMIT-like batch editing
with the null-space constraint). :meth:`AlphaEdit.compute_in_sequence` takes the sequence's
earlier patches (oldest first, all applied to the model) and keeps their keys, so a saved
sequence — its patches loaded in order — can be continued, re-applied and reverted (in reverse
order) from its files alone; the editor only keeps a running sum of K_pᵀK_p keyed by the
patches' digests, so passing the growing list costs O(new patch) per call.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lmscalpel.core.config import ConfigError, MethodConfig, option
from lmscalpel.core.requests import EditRequest
from lmscalpel.mechanics.stats import KeyStatistics
from lmscalpel.methods.base import register
from lmscalpel.methods.memit import LayerSolver, MassEditConfig, MassEditor
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch, PatchError

log = logging.getLogger(__name__)

KEYS = "keys.{}"
"""The name of the extra tensor holding a patch's keys at one layer."""


def null_space_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    basis: torch.Tensor,
    earlier: torch.Tensor | None,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update of one (d_out, d_k) matrix as factors (left (d_out, N), right (N, d_k)).

    ``keys`` K (N, d_k), ``residuals`` R (N, d_out), one row per request; ``basis`` U (d_k, r),
    orthonormal columns spanning the null space (P = UUᵀ); ``earlier`` the sum KₚᵀKₚ (d_k, d_k)
    over the keys of earlier edits (``None``: none); ``ridge`` α. ``left @ right`` =
    Rᵀ K P (M P + α I)⁻¹ with M = KₚᵀKₚ + KᵀK (the paper's eq. 13), computed in the null space's
    coordinates as Rᵀ (KU) (UᵀMU + α I_r)⁻¹ Uᵀ — the same matrix (multiply out (MP + αI)), with
    an r × r solve instead of d_k × d_k. Every key k with Pk = 0 maps to exactly what it mapped
    to before. Float64, :func:`torch.linalg.solve` (no inverse).
    """
    k = keys.double()
    u = basis.to(k.device, torch.float64)
    local = k @ u  # (N, r): the keys' null-space coordinates
    system = local.T @ local
    if earlier is not None:
        system = system + u.T @ earlier.to(k.device, torch.float64) @ u
    system = system + ridge * torch.eye(u.shape[1], dtype=torch.float64, device=k.device)
    solved = torch.linalg.solve(system, local.T)  # (r, N)
    return residuals.double().T.contiguous(), (u @ solved).T.contiguous()


def keys_digest(extras: Mapping[str, torch.Tensor], layers: Sequence[int]) -> str:
    """SHA-256 over the keys a patch stores (its ``extras``) at ``layers``: the identity of what a
    sequence preserves."""
    digest = hashlib.sha256()
    for layer in layers:
        tensor = extras[KEYS.format(layer)].contiguous()
        digest.update(f"{layer}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class AlphaEditConfig(MassEditConfig):
    """AlphaEdit's hyperparameters: MEMIT's shared ones (:class:`MassEditConfig`) plus the null
    space and the ridge."""

    null_energy: float = option(
        0.1,
        "the null space: C's eigenvectors with the smallest eigenvalues holding at most this "
        "share of E[‖k‖²]",
        above=0,
        below=1,
    )
    ridge: float = option(
        1.0,
        "α in (M P + α I), in units of E[‖Pk‖²] = tr(PC), a typical key's energy in the null space",
        above=0,
        at_most=1e12,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.statistics:
            raise ConfigError(
                "AlphaEditConfig.statistics must be True: the null space comes from the key "
                "statistics (use memit for an update without them)"
            )


@register
class AlphaEdit(MassEditor):
    """AlphaEdit: MEMIT's mass edit projected onto the preserved keys' null space, keeping the
    keys of earlier edits in sequence (see the module docstring)."""

    name: ClassVar[str] = "alphaedit"
    config_class: ClassVar[type[MethodConfig]] = AlphaEditConfig
    citation: ClassVar[str] = (
        "Fang, Jiang, Wang, Ma, Shi, Wang, He and Chua 2025, AlphaEdit: Null-Space Constrained "
        "Knowledge Editing for Language Models"
    )

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self.reset()

    def reset(self) -> None:
        """Forget the running sum of earlier keys (it is rebuilt from the patches when needed)."""
        self._chain: list[str] = []  # digests of the patches summed in _earlier, in order
        self._earlier: dict[int, torch.Tensor] = {}
        self._layers: list[int] = []

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: AlphaEditConfig
    ) -> Patch:
        """A fresh sequence: the update ignores any earlier edits' keys."""
        return self.compute_in_sequence(lm, requests, config, [])

    def compute_in_sequence(
        self,
        lm: LoadedModel,
        requests: Sequence[EditRequest],
        config: AlphaEditConfig,
        earlier: Sequence[Patch],
    ) -> Patch:
        """The patch for ``requests`` on ``lm``, which carries ``earlier`` (this sequence's AlphaEdit
        patches so far, oldest first, all applied): the update leaves their keys' values alone."""
        layers = config.edit_layers(lm.adapter.num_layers, lm.fingerprint)
        sums = self._earlier_keys(earlier, layers)
        chain = hashlib.sha256("|".join(self._chain).encode()).hexdigest()
        null_dimensions: dict[str, int] = {}

        def solver(stats: dict[int, KeyStatistics]) -> LayerSolver:
            def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor):
                found = stats[layer]
                basis = found.null_space_basis(config.null_energy)
                null_dimensions[str(layer)] = basis.shape[1]
                if basis.shape[1] == 0:
                    raise ConfigError(
                        f"AlphaEditConfig.null_energy {config.null_energy} leaves layer {layer} "
                        "no null space (its smallest eigenvalue holds more of E[‖k‖²]): raise it"
                    )
                ridge = config.ridge * found.null_space_energy(
                    config.null_energy
                )  # α = ridge · tr(PC)
                return null_space_update(keys, residuals, basis, sums.get(layer), ridge)

            return solve

        updates, record = self._mass_edit(lm, requests, config, solver)
        extras = {KEYS.format(u.layer): u.keys.float().cpu().contiguous() for u in updates}
        record["alphaedit"] = {
            "keys_sha256": keys_digest(extras, layers),
            "earlier_patches": len(earlier),
            "earlier_keys": sum(len(p.requests) for p in earlier),
            "earlier_chain_sha256": chain,
            "null_dimensions": null_dimensions,
        }
        return self._patch(lm, requests, config, updates, record, extras=extras)

    def _earlier_keys(
        self, earlier: Sequence[Patch], layers: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        """Σ KₚᵀKₚ per layer over the keys ``earlier`` patches stored, extending the running sum
        when it covers a prefix of them (only patches new to it are read and verified)."""
        layers = list(layers)
        digests = []
        for number, patch in enumerate(earlier):
            if patch.method != self.name:
                raise PatchError(
                    f"earlier patch {number} was made by {patch.method}, not alphaedit"
                )
            stored = patch.info.get("alphaedit", {}).get("keys_sha256")
            if stored is None:
                raise PatchError(f"earlier patch {number} records no keys")
            digests.append(stored)
        if layers != self._layers or digests[: len(self._chain)] != self._chain:
            log.debug("alphaedit: a new sequence; rebuilding the earlier keys")
            self.reset()
            self._layers = layers
        for number in range(len(self._chain), len(earlier)):
            patch = earlier[number]
            missing = [layer for layer in layers if KEYS.format(layer) not in patch.extras]
            if missing:
                raise PatchError(
                    f"earlier patch {number} holds no keys for layers {missing}: it cannot be "
                    f"continued with layers {layers}"
                )
            if keys_digest(patch.extras, layers) != digests[number]:
                raise PatchError(
                    f"earlier patch {number}: its stored keys do not match their digest"
                )
            for layer in layers:
                keys = patch.extras[KEYS.format(layer)].double()
                outer = keys.T @ keys
                self._earlier[layer] = (
                    self._earlier[layer] + outer if layer in self._earlier else outer
                )
            self._chain.append(digests[number])
        return dict(self._earlier)
