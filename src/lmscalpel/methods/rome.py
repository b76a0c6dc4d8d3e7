"""ROME: Rank-One Model Editing (Meng et al. 2022, "Locating and Editing Factual Associations in
GPT", NeurIPS 2022).

A fact (subject, relation, object) is recalled by the MLP of a middle layer at the subject's last
token: its output matrix W maps the key k (the MLP's hidden activation there) to a value v that
later layers turn into the object. ROME rewrites the fact by changing W so that the subject's key
k* maps to a new value v* that makes the new object likely, and disturbs other keys as little as
possible on average:

    W' = W + (v* − W k*) (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)             (the paper's eq. 2, solved)

with C = E[k kᵀ] the second moment of keys over text (identity when statistics are off). Then
W' k* = v* exactly, and W' k = W k for every key with kᵀC⁻¹k* = 0.

Here: k* and v* come from :mod:`lmscalpel.mechanics.keys_values` (k* averaged over the prompt behind short
generated context prefixes, :mod:`lmscalpel.mechanics.prefixes`; v* = W k* + δ with δ optimised at the
subject's last token), C from :mod:`lmscalpel.mechanics.stats`, and the patch stores the two rank-one
factors per request (a batch of requests is applied one after another, as in the paper's code,
and stored as one rank-r delta). docs/rome.md explains the choices and their measurements.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from lmscalpel.core.config import ConfigError, MethodConfig, option
from lmscalpel.core.requests import EditRequest
from lmscalpel.mechanics.keys_values import ValueOptions, ValueResult, optimise_value
from lmscalpel.mechanics.peaks import LayerChoice, choose_edit_layer
from lmscalpel.mechanics.prefixes import context_prefixes
from lmscalpel.mechanics.stats import DEFAULT_CORPUS, DEFAULT_SAMPLES, KeyStatistics, key_statistics
from lmscalpel.methods.base import Editor, register, resolve_layers
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import ParameterDelta, Patch, weight_snapshot

log = logging.getLogger(__name__)


def rank_one_update(
    weight: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    c_inv_key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (left (out, 1), right (1, in)) of ROME's update of ``weight`` (out, in).

    ``key`` k* (in,), ``value`` v* (out,), ``c_inv_key`` C⁻¹k* (in,) (``None``: C = I).
    ``weight + left @ right`` maps k* to v*, and leaves every k with kᵀC⁻¹k* = 0 unchanged.
    Computed in float64.
    """
    key = key.double()
    direction = key if c_inv_key is None else c_inv_key.double()
    denominator = direction @ key
    if not torch.isfinite(denominator) or denominator.abs() < 1e-12:
        raise ValueError("degenerate key: (C⁻¹k*)ᵀk* is zero or not finite")
    residual = value.double() - weight.double() @ key
    return residual[:, None], (direction / denominator)[None, :]


@dataclass
class RankOneEdit:
    """One request's update of the (out, in) matrix of ``layer``: ``left @ right`` (out, in) maps
    ``key`` k* (in,) to ``value`` v* (out,); ``solution`` is how v* was found."""

    layer: int
    key: torch.Tensor
    value: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    solution: ValueResult

    def summary(self) -> dict:
        return {
            "steps": self.solution.steps,
            "nll": [round(x, 4) for x in self.solution.nll],
            "delta_norm": round(float(self.solution.delta.norm()), 4),
            "value_norm": round(self.solution.value_norm, 4),
        }


def rank_one_edit(
    lm: LoadedModel,
    layer: int,
    request: EditRequest,
    prefixes: Sequence[str],
    stats: KeyStatistics | None,
    options: ValueOptions,
    *,
    exact: bool = True,
) -> RankOneEdit:
    """ROME's update of layer ``layer`` for one request, on the model as it is now (unchanged).

    k* is the subject's key averaged over ``prefixes``; v* = W k* + δ with δ from
    :func:`~lmscalpel.mechanics.keys_values.optimise_value`; C from ``stats`` (``None``: identity). With
    ``exact``, δ is optimised as the update will really apply it at each position (scaled by
    (C⁻¹k*)ᵀk / (C⁻¹k*)ᵀk*); without, at the anchor only, as in the paper. The update's key —
    numerator, direction and denominator — is the very key δ was optimised for (the r-ROME
    check of Gupta et al. 2024; docs/rome.md and tests/test_batched_values.py).
    """
    solver = (lambda k: k) if stats is None else stats.solve
    solution = optimise_value(
        lm, layer, request, prefixes, options, key_solver=solver if exact else None
    )
    weight = lm.adapter.mlp_out_weight(layer)
    key = solution.key.double()
    value = weight.double() @ key + solution.delta.double()
    c_inv_key = None if stats is None else stats.solve(key).to(weight.device)
    left, right = rank_one_update(weight, key, value, c_inv_key)
    log.debug("rome %r: %d steps, nll %s", request.subject, solution.steps, solution.nll)
    return RankOneEdit(layer, key, value, left, right, solution)


@dataclass
class ROMEConfig(ValueOptions):
    """ROME's hyperparameters: the value optimisation's
    (:class:`~lmscalpel.mechanics.keys_values.ValueOptions`, inherited) plus where to edit, the
    key statistics and the context prefixes.

    An unset ``layer`` is resolved by :meth:`edit_layer`: the MLP peak of the model's recorded
    causal-tracing aggregate (:mod:`lmscalpel.mechanics.peaks`), else ``default_depth`` of the
    depth (per family below; for unknown families the causal-tracing peak of mid-sized models).
    """

    layer: int | None = option(
        None, "MLP to edit (negative counts from the top); unset: the traced peak or default_depth"
    )
    default_depth: float = option(
        0.2,
        "the edit layer as a fraction of the depth, when layer is unset and nothing was traced",
        at_least=0,
        at_most=1,
    )
    statistics: bool = option(
        True, "weight the update by the key statistics C = E[kkᵀ] (False: C = I)"
    )
    stats_corpus: str = option(
        DEFAULT_CORPUS,
        "text for the statistics: 'model' (sampled from the model) or a path",
        nonempty=True,
        path=True,
    )
    stats_samples: int = option(
        DEFAULT_SAMPLES, "tokens in the statistics' estimate", at_least=1, at_most=10**10
    )
    prefixes: int = option(
        3, "generated context prefixes the key and value are averaged over", at_least=0, at_most=100
    )
    prefix_length: int = option(
        5, "tokens in each generated context prefix", at_least=1, at_most=1024
    )
    exact_injection: bool = option(
        True, "optimise δ as the rank-one update will apply it at every position"
    )

    # Edit depths from the paper and its successors: GPT-2 XL layer 17 of 48, GPT-J 5 of 28,
    # GPT-NeoX-20B 15 of 44, Llama/Mistral/Qwen-7B 5 of 32 (EasyEdit's tuned settings).
    family_defaults: ClassVar[dict[str, dict]] = {
        "gpt2": {"default_depth": 0.36},
        "gptj": {"default_depth": 0.19},
        "gpt_neox": {"default_depth": 0.34},
        # layer 8 of 30, the best of docs/rome.md's sweep (a traced model edits its peak)
        "llama": {"default_depth": 0.276},
        "mistral": {"default_depth": 0.16},
        "qwen2": {"default_depth": 0.16},
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.default_depth <= 1.0:
            raise ConfigError(
                f"ROMEConfig.default_depth must be in [0, 1], got {self.default_depth}"
            )
        for name in ("stats_samples", "prefix_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ROMEConfig.{name} must be at least 1")
        if self.prefixes < 0:
            raise ConfigError("ROMEConfig.prefixes must be >= 0")

    def layer_choice(self, num_layers: int, fingerprint: str | None = None) -> LayerChoice:
        """Which layer to edit on a model of ``num_layers`` layers with weight ``fingerprint``,
        and why (:func:`~lmscalpel.mechanics.peaks.choose_edit_layer`): ``layer`` if set; else the
        MLP peak of the model's causal-tracing aggregate (recorded by the user, else shipped);
        else ``default_depth`` of the depth."""
        configured = None if self.layer is None else resolve_layers([self.layer], [], num_layers)[0]
        return choose_edit_layer(
            num_layers,
            fingerprint,
            configured=configured,
            depth_layer=resolve_layers(None, [self.default_depth], num_layers)[0],
            default_depth=self.default_depth,
        )

    def edit_layer(self, num_layers: int, fingerprint: str | None = None) -> int:
        """The layer to edit: :meth:`layer_choice`'s layer."""
        return self.layer_choice(num_layers, fingerprint).layer


@register
class ROME(Editor):
    """ROME: a closed-form rank-one update of one MLP output matrix (see the module docstring)."""

    name: ClassVar[str] = "rome"
    config_class: ClassVar[type[MethodConfig]] = ROMEConfig
    citation: ClassVar[str] = (
        "Meng, Bau, Andonian and Belinkov 2022, Locating and Editing Factual Associations in GPT"
    )

    def config_for(self, lm: LoadedModel) -> ROMEConfig:
        """The configuration with its layer resolved for ``lm`` (the traced peak or the family's
        depth), so that run manifests and patches record the layer really edited."""
        config = super().config_for(lm)
        if config.layer is None:
            choice = config.layer_choice(lm.adapter.num_layers, lm.fingerprint)
            log.debug("rome edits layer %d of %s: %s", choice.layer, lm.name, choice.explain())
            config = config.replace(layer=choice.layer)
        return config

    def prepare(self, lm: LoadedModel, config: ROMEConfig) -> None:
        """Generate the context prefixes and compute the key statistics (both cached)."""
        self._resources(lm, config)

    @staticmethod
    def _resources(
        lm: LoadedModel, config: ROMEConfig
    ) -> tuple[int, list[str], KeyStatistics | None]:
        layer = config.edit_layer(lm.adapter.num_layers, lm.fingerprint)
        prefixes = context_prefixes(lm, config.prefixes, config.prefix_length)
        stats = (
            key_statistics(lm, layer, config.stats_corpus, config.stats_samples)
            if config.statistics
            else None
        )
        return layer, prefixes, stats

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: ROMEConfig
    ) -> Patch:
        adapter = lm.adapter
        layer, prefixes, stats = self._resources(lm, config)
        name = adapter.mlp_out_weight_name(layer)
        lefts, rights, records = [], [], []
        with weight_snapshot(lm, [name]):
            for request in requests:
                start = time.perf_counter()
                change = rank_one_edit(
                    lm, layer, request, prefixes, stats, config, exact=config.exact_injection
                )
                with torch.no_grad():  # later requests see earlier edits, as in the paper
                    weight = adapter.mlp_out_weight(layer)
                    weight.add_((change.left @ change.right).to(weight.dtype))
                lefts.append(change.left)
                rights.append(change.right)
                records.append(
                    {**change.summary(), "seconds": round(time.perf_counter() - start, 3)}
                )
        left, right = adapter.low_rank_to_storage(
            name, torch.cat(lefts, dim=1).float(), torch.cat(rights, dim=0).float()
        )
        return Patch.from_deltas(
            lm,
            self.name,
            requests,
            [ParameterDelta.from_low_rank(name, left, right)],
            hyperparameters={**config.to_dict(), "layer": layer},
            info={"layer": layer, "prefixes": prefixes, "requests": records},
        )
