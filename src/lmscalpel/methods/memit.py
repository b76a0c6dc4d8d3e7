"""MEMIT: Mass-Editing Memory in a Transformer (Meng, Sharma, Andonian, Belinkov and Bau, ICLR
2023, arXiv 2210.07229).

ROME writes one fact into one MLP; MEMIT writes thousands at once, spread over a range of MLP
layers R = {l₁ < … < l_L} at the subjects' last tokens. For N requests:

1. **Target hidden states.** For each request, a vector δᵢ added to the residual stream at the
   output of the *last* layer l_L (at the subject's last token) is optimised so that the new
   target becomes likely (the same loss as ROME's v*: NLL behind the context prefixes + KL on
   "{subject} is a" + a norm penalty; :func:`~lmscalpel.mechanics.keys_values.optimise_values`,
   all N requests in batched passes). zᵢ = hᵢ + δᵢ, hᵢ the unedited hidden state there
   (averaged over the prefixes, like the keys).
2. **Spread over the layers, lowest first.** At layer lⱼ the keys K (N, d_k) — the inputs of
   its MLP output matrix at the subjects' last tokens, recomputed on the model with the layers
   below already updated — and the residuals rᵢ = (zᵢ − hᵢ(current)) / (L − j + 1) (what is left,
   shared by the layers not yet updated) give the least-squares update

       Δ = R Kᵀ (λ C + K Kᵀ)⁻¹            (the paper's eq. 14, keys and residuals as columns)

   with C = E[k kᵀ] the keys' second moment over text (:mod:`lmscalpel.mechanics.stats`; λ is
   ``mom2_weight``, the weight of the preserved keys against the new ones). It is solved with
   :func:`torch.linalg.solve` in float64 whatever the model's dtype, never with an inverse.
3. **The patch** holds one delta per layer: the low-rank factors R (d_out, N) and
   (A⁻¹K)ᵀ (N, d_k) when N (d_out + d_k) < d_out d_k, the dense matrix otherwise.

With one request and one layer this is ROME's update scaled by s = kᵀC⁻¹k / (λ + kᵀC⁻¹k) < 1
(Sherman-Morrison): ROME imposes W'k* = v* exactly, MEMIT trades the new key off against λC.
The δ differs only in where it is optimised (ROME: at the MLP output, with exact injection;
MEMIT: at the block output, at the subject's last token only). docs/memit.md has the details
and the settings for the embedded model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lmscalpel.core.config import ConfigError, MethodConfig, option
from lmscalpel.core.requests import EditRequest
from lmscalpel.mechanics.keys_values import (
    AnchorStates,
    ValueOptions,
    ValueResult,
    optimise_values,
)
from lmscalpel.mechanics.peaks import LayerChoice, edit_range
from lmscalpel.mechanics.prefixes import context_prefixes
from lmscalpel.mechanics.stats import KeyStatistics, input_statistics
from lmscalpel.methods.base import Editor, new_default, register, resolve_layers
from lmscalpel.methods.rome import ROMEConfig
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import ParameterDelta, Patch, weight_snapshot

log = logging.getLogger(__name__)

LayerSolver = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(layer, keys K (N, d_k), residuals R (N, d_out)) ↦ the update's factors (left (d_out, N),
right (N, d_k)), float64: how one layer's share of the residuals becomes a weight change."""


def least_squares_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    moment: torch.Tensor | None,
    mom2_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's update of one (d_out, d_k) matrix, as factors (left (d_out, N), right (N, d_k)).

    ``keys`` K (N, d_k) and ``residuals`` R (N, d_out) are one row per request; ``moment`` C
    (d_k, d_k) = E[k kᵀ] (``None``: the identity). ``left @ right`` = Rᵀ K (λC + KᵀK)⁻¹, the
    minimiser of ‖ΔKᵀ − Rᵀ‖² + λ tr(Δ C Δᵀ): the new keys map to the residuals as far as the
    preserved keys (weighted by λ) allow. Float64, :func:`torch.linalg.solve` (no inverse).
    """
    k = keys.double()
    device = k.device
    c = (
        torch.eye(k.shape[1], dtype=torch.float64, device=device)
        if moment is None
        else moment.to(device, torch.float64)
    )
    system = mom2_weight * c + k.T @ k
    right = torch.linalg.solve(system, k.T).T  # (N, d_k): the rows of K A⁻¹ (A symmetric)
    return residuals.double().T.contiguous(), right.contiguous()


def layer_delta(
    lm: LoadedModel, layer: int, left: torch.Tensor, right: torch.Tensor
) -> ParameterDelta:
    """The :class:`~lmscalpel.patch.ParameterDelta` of layer ``layer``'s MLP output matrix for
    the (d_out, d_k) update ``left @ right``: low-rank factors when they hold fewer numbers than
    the dense matrix, the dense matrix otherwise; float32, in the parameter's storage layout."""
    adapter = lm.adapter
    name = adapter.mlp_out_weight_name(layer)
    rows, cols = left.shape[0], right.shape[1]
    rank = left.shape[1]
    if rank * (rows + cols) < rows * cols:
        stored = adapter.low_rank_to_storage(name, left.float(), right.float())
        return ParameterDelta.from_low_rank(name, *stored)
    dense = (left.double() @ right.double()).float()
    return ParameterDelta.from_dense(name, adapter.to_storage(name, dense).contiguous())


@dataclass
class LayerUpdate:
    """One layer's share of a mass edit: the update ``left @ right`` (float64, (d_out, d_k)) from
    the ``keys`` (N, d_k) read on the model as it was then (lower layers already updated) and the
    ``residuals`` (N, d_out) it was asked to write; ``delta`` is what the patch stores and what
    was applied before the layers above read their keys."""

    layer: int
    keys: torch.Tensor
    residuals: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    delta: ParameterDelta

    def summary(self) -> dict:
        return {
            "layer": self.layer,
            "residual_norm": round(float(self.residuals.norm(dim=1).mean()), 4),
            "update_norm": round(self.delta.norm(), 4),
            "stored": "low-rank" if self.delta.rank is not None else "dense",
        }


def spread_updates(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    layers: Sequence[int],
    prefixes: Sequence[str],
    options: ValueOptions,
    solve: LayerSolver,
    *,
    batch_size: int | None = None,
) -> tuple[list[LayerUpdate], list[ValueResult]]:
    """MEMIT's steps 1 and 2 (see the module docstring) with the per-layer solve as a parameter
    (MEMIT's least squares, AlphaEdit's null-space-projected one): the target hidden states at
    the top of ``layers``, then the residual spread over ``layers`` from the lowest up, each
    layer's keys read after the layers below were updated. The model is unchanged afterwards
    (the updates are applied to it temporarily, and restored and verified also on error)."""
    adapter = lm.adapter
    layers = sorted(layers)
    top = layers[-1]
    z_module = adapter.layer_name(top)
    start = time.perf_counter()
    solutions = optimise_values(
        lm, top, requests, prefixes, options, module=z_module, batch_size=batch_size
    )
    log.debug("%d target hidden states in %.1f s", len(requests), time.perf_counter() - start)
    targets = torch.stack([s.output.double() + s.delta.double() for s in solutions])
    names = [adapter.mlp_out_weight_name(layer) for layer in layers]
    updates: list[LayerUpdate] = []
    passes = AnchorStates(lm, requests, prefixes)
    with weight_snapshot(lm, names):
        for j, layer in enumerate(layers):
            key_module = adapter.mlp_out_name(layer)
            # from the input of the layer updated last: nothing below it has changed since
            found_in, found_out = passes.read([key_module], [z_module], keep=layer, resume=j > 0)
            keys = found_in[key_module].double()
            residuals = (targets - found_out[z_module].double()) / (len(layers) - j)
            left, right = solve(layer, keys, residuals)
            delta = layer_delta(lm, layer, left, right)
            with torch.no_grad():  # the layers above read their keys on the updated model
                param = lm.model.get_parameter(delta.name)
                param.add_(delta.materialize(param.dtype, param.device))
            updates.append(LayerUpdate(layer, keys.float(), residuals, left, right, delta))
            log.debug("layer %d: mean residual norm %.4f", layer, residuals.norm(dim=1).mean())
    return updates, solutions


def value_summary(solution: ValueResult) -> dict:
    """What a patch records about one request's optimised value."""
    return {
        "steps": solution.steps,
        "nll": [round(x, 4) for x in solution.nll],
        "delta_norm": round(float(solution.delta.norm()), 4),
        "value_norm": round(solution.value_norm, 4),
    }


@dataclass
class MassEditConfig(ValueOptions):
    """What MEMIT and AlphaEdit share: the value optimisation's options (inherited; here δ is
    added to the residual stream, so ``lr`` and ``clamp_norm`` are in units of its norm), the
    layer range, the statistics and the context prefixes (declared once, in ROME's config).

    An unset ``layers`` is resolved by :meth:`edit_layers`: ``span`` consecutive layers from the
    MLP peak of the model's causal-tracing aggregate (:func:`lmscalpel.mechanics.peaks.edit_range`),
    else from ``first_depth`` of the depth.
    """

    layers: list[int] | None = option(
        None,
        "MLP layers to edit (negative counts from the top); unset: span layers from the traced "
        "MLP peak, else from first_depth",
    )
    span: int = option(5, "how many consecutive layers to edit when layers is unset", at_least=1)
    first_depth: float = option(
        0.2,
        "the lowest edited layer as a fraction of the depth, when layers is unset and the model "
        "was never traced",
        at_least=0,
        at_most=1,
    )
    statistics: bool = new_default(ROMEConfig, "statistics", True)
    stats_corpus: str = new_default(ROMEConfig, "stats_corpus", "model")
    stats_samples: int = new_default(ROMEConfig, "stats_samples", 20_000)
    prefixes: int = new_default(ROMEConfig, "prefixes", 3)
    prefix_length: int = new_default(ROMEConfig, "prefix_length", 5)
    batch_size: int = option(
        32,
        "requests whose target hidden states are optimised together in one batched pass",
        at_least=1,
        at_most=100_000,
    )
    lr: float = new_default(ValueOptions, "lr", 0.5)
    clamp_norm: float = new_default(ValueOptions, "clamp_norm", 0.75)
    weight_decay: float = new_default(ValueOptions, "weight_decay", 0.5)

    # The lowest edited layer per family when the model was never traced (MEMIT edits GPT-J's
    # layers 3-8 of 28 and GPT-2 XL's 13-17 of 48; EasyEdit Llama-7B's 4-8 of 32).
    family_defaults: ClassVar[dict[str, dict]] = {
        "gpt2": {"first_depth": 0.28},
        "gptj": {"first_depth": 0.11},
        "gpt_neox": {"first_depth": 0.25},
        "llama": {"first_depth": 0.13},
        "mistral": {"first_depth": 0.13},
        "qwen2": {"first_depth": 0.13},
    }

    def layer_range(
        self, num_layers: int, fingerprint: str | None = None
    ) -> tuple[list[int], LayerChoice | None]:
        """The layers to edit and, when they were chosen rather than configured, why their
        lowest one (:func:`~lmscalpel.mechanics.peaks.edit_range`)."""
        if self.layers is not None:
            layers = sorted(set(resolve_layers(self.layers, [], num_layers)))
            if layers[-1] == num_layers - 1:
                raise ConfigError(
                    f"{type(self).__name__}.layers {list(self.layers)} includes the last layer "
                    f"({num_layers - 1}): the target hidden state is optimised at the top edited "
                    "layer's output at the subject's last token, and with no layer above it that "
                    "state reaches no later token; edit lower layers"
                )
            return layers, None
        depth_layer = resolve_layers(None, [self.first_depth], num_layers)[0]
        return edit_range(
            num_layers,
            fingerprint,
            span=self.span,
            depth_layer=depth_layer,
            default_depth=self.first_depth,
        )

    def edit_layers(self, num_layers: int, fingerprint: str | None = None) -> list[int]:
        return self.layer_range(num_layers, fingerprint)[0]


@dataclass
class MEMITConfig(MassEditConfig):
    """MEMIT's hyperparameters: :class:`MassEditConfig` plus the weight λ of the key statistics.

    λ is given per key dimension: a typical key k has kᵀC⁻¹k ≈ d_k (E[kᵀC⁻¹k] = tr I), so one
    layer realises about d_k / (λ + d_k) of a lone request's residual whatever the width —
    ``mom2_weight`` = λ / d_k = 1 is half (the paper's GPT-J setting, 15000 for d_k = 16384).

    The target hidden states are optimised further than ROME's values (``stop_nll`` 0.05, at most
    25 steps: the paper's stopping loss and step count): the layers realise only part of each
    residual, so a target that is barely likely at z is lost in the solve (docs/memit.md measures
    ES 94 at ROME's 0.5 against 97 at 0.05 on a batch of 100).
    """

    stop_nll: float = new_default(ValueOptions, "stop_nll", 0.05)
    max_steps: int = new_default(ValueOptions, "max_steps", 25)
    mom2_weight: float = option(
        1.0,
        "λ / d_k: weight of the preserved keys' statistics C against the new keys in λC + KKᵀ, "
        "in units of the key size d_k (the paper's λ = 15000 on GPT-J is 0.92)",
        above=0,
        at_most=1e9,
    )


class MassEditor(Editor):
    """An editor built on :func:`spread_updates` (MEMIT, AlphaEdit): subclasses give the solve."""

    def config_for(self, lm: LoadedModel) -> MassEditConfig:
        """The configuration with its layers resolved for ``lm``, so that run manifests and
        patches record the layers really edited."""
        config = super().config_for(lm)
        if config.layers is None:
            layers, choice = config.layer_range(lm.adapter.num_layers, lm.fingerprint)
            if choice is not None:
                log.debug(
                    "%s edits layers %s of %s: %s", self.name, layers, lm.name, choice.explain()
                )
            config = config.replace(layers=layers)
        return config

    def prepare(self, lm: LoadedModel, config: MassEditConfig) -> None:
        """Generate the context prefixes and compute every layer's key statistics (cached)."""
        self._resources(lm, config)

    @staticmethod
    def _resources(
        lm: LoadedModel, config: MassEditConfig
    ) -> tuple[list[int], list[str], dict[int, KeyStatistics]]:
        layers = config.edit_layers(lm.adapter.num_layers, lm.fingerprint)
        prefixes = context_prefixes(lm, config.prefixes, config.prefix_length)
        stats: dict[int, KeyStatistics] = {}
        if config.statistics:
            names = {lm.adapter.mlp_out_weight_name(layer): layer for layer in layers}
            found = input_statistics(lm, list(names), config.stats_corpus, config.stats_samples)
            stats = {names[name]: value for name, value in found.items()}
        return layers, prefixes, stats

    def _mass_edit(
        self,
        lm: LoadedModel,
        requests: Sequence[EditRequest],
        config: MassEditConfig,
        solver: Callable[[dict[int, KeyStatistics]], LayerSolver],
    ) -> tuple[list[LayerUpdate], dict]:
        """The layer updates for ``requests`` and what the patch records about them."""
        start = time.perf_counter()
        layers, prefixes, stats = self._resources(lm, config)
        ready = time.perf_counter()
        updates, solutions = spread_updates(
            lm, requests, layers, prefixes, config, solver(stats), batch_size=config.batch_size
        )
        seconds = {"resources": ready - start, "edit": time.perf_counter() - ready}
        record = {
            "layers": layers,
            "prefixes": prefixes,
            "requests": [value_summary(s) for s in solutions],
            "layer_updates": [u.summary() for u in updates],
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        return updates, record

    def _patch(
        self,
        lm: LoadedModel,
        requests: Sequence[EditRequest],
        config: MassEditConfig,
        updates: Sequence[LayerUpdate],
        record: dict,
        **extra,
    ) -> Patch:
        return Patch.from_deltas(
            lm,
            self.name,
            requests,
            [u.delta for u in updates],
            hyperparameters={**config.to_dict(), "layers": record["layers"]},
            info=record,
            **extra,
        )


@register
class MEMIT(MassEditor):
    """MEMIT: many facts at once, spread over a range of MLP layers (see the module docstring)."""

    name: ClassVar[str] = "memit"
    config_class: ClassVar[type[MethodConfig]] = MEMITConfig
    citation: ClassVar[str] = (
        "Meng, Sharma, Andonian, Belinkov and Bau 2023, Mass-Editing Memory in a Transformer"
    )

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: MEMITConfig
    ) -> Patch:
        def solver(stats: dict[int, KeyStatistics]) -> LayerSolver:
            def solve(layer: int, keys: torch.Tensor, residuals: torch.Tensor):
                moment = stats[layer].moment if layer in stats else None
                weight = config.mom2_weight * keys.shape[1]
                return least_squares_update(keys, residuals, moment, weight)

            return solve

        updates, record = self._mass_edit(lm, requests, config, solver)
        return self._patch(lm, requests, config, updates, record)
