"""LoRA: fine-tuning a low-rank update of chosen MLP matrices, through ``peft``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes a weight
matrix W (out, in) and trains W + (alpha / r) · B A with A (r, in) and B (out, r), B starting at
zero. Here ``peft`` injects the adapters into the chosen MLP matrices, Adam trains them on the edit
requests (the fine-tuning objectives of :mod:`lmscalpel.methods.ft`), and the result is returned as
a patch holding, per adapted matrix, the merged low-rank delta (alpha / r · B) @ A as
:meth:`~lmscalpel.patch.ParameterDelta.from_low_rank` factors (in storage layout). It applies,
reverts, saves and exports like any other patch. The adapters are removed before :meth:`compute`
returns, also on error: the model keeps its modules, parameters and weights exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel

from lmscalpel.core.config import ConfigError, MethodConfig, option
from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.base import Editor, new_default, register
from lmscalpel.methods.ft import FitOptions, Objective, TunedWeights, fit
from lmscalpel.models.adapter import module_of
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import ParameterDelta, Patch, PatchError

ADAPTER = "lmscalpel"


@dataclass
class LoRAConfig(FitOptions, TunedWeights):
    """Hyperparameters of LoRA editing: which MLP matrices get an adapter
    (:class:`~lmscalpel.methods.ft.TunedWeights`), how the adapters are trained
    (:class:`~lmscalpel.methods.ft.FitOptions`; by default on the teacher-forced target tokens,
    prompt masked), and the adapter: rank r, ``alpha`` (the update is scaled by alpha / r) and the
    ``seed`` of A's random initialisation.
    """

    default_depths: list[float] = new_default(TunedWeights, "default_depths", (0.3, 0.4, 0.5))
    rank: int = option(8, "the adapters' rank r", at_least=1, at_most=65_536)
    alpha: float = option(16.0, "the update is scaled by alpha / r", above=0, at_most=1e6)
    objective: Objective = new_default(FitOptions, "objective", "target")
    lr: float = new_default(FitOptions, "lr", 2e-3)
    steps: int = new_default(FitOptions, "steps", 30)
    stop_loss: float = new_default(FitOptions, "stop_loss", 0.05)
    seed: int = option(0, "seed of the random initialisation of A", at_least=0, below=2**63)


def _remove_adapters(tuner: LoraModel, model: torch.nn.Module) -> None:
    """Put the original modules back (peft's unload) and check that nothing of peft remains."""
    tuner.unload()
    leftovers = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if leftovers:
        raise PatchError(f"peft adapters could not be removed from {leftovers}")
    if getattr(model, "peft_config", None) is not None:
        del model.peft_config


@register
class LoRA(Editor):
    """LoRA fine-tuning; the patch is the merged low-rank delta (see the module docstring)."""

    name: ClassVar[str] = "lora"
    config_class: ClassVar[type[MethodConfig]] = LoRAConfig
    citation: ClassVar[str] = "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models"

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: LoRAConfig
    ) -> Patch:
        names = config.weight_names(lm)
        modules = [module_of(n) for n in names]
        transposed = {lm.adapter.is_transposed(n) for n in names}
        if len(transposed) > 1:
            raise ConfigError("LoRA cannot mix transposed (Conv1D) and plain matrices")
        peft_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=modules,
            lora_dropout=0.0,
            bias="none",
            fan_in_fan_out=transposed.pop(),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            tuner = LoraModel(lm.model, peft_config, ADAPTER)
        try:
            layers = [lm.model.get_submodule(m) for m in modules]
            params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
            info = fit(lm, requests, params, config, name=self.name)
            with torch.no_grad():  # the update (alpha/r) B @ A, (out, in), as its two factors
                factors = [
                    (
                        layer.lora_B[ADAPTER].weight * layer.scaling[ADAPTER],  # (out, r)
                        layer.lora_A[ADAPTER].weight.clone(),  # (r, in)
                    )
                    for layer in layers
                ]
        finally:
            _remove_adapters(tuner, lm.model)
        deltas = [  # the adapter knows the storage layout once the original modules are back
            ParameterDelta.from_low_rank(name, *lm.adapter.low_rank_to_storage(name, up, down))
            for name, (up, down) in zip(names, factors)
        ]
        return Patch.from_deltas(lm, self.name, requests, deltas, config.to_dict(), info)
