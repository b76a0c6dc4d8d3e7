"""The model handle every part of lmscalpel passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapter import ModelAdapter

if TYPE_CHECKING:
    from ..patch import Patch


class PromptRewriter(Protocol):
    """What an applied in-context patch does: rewrite every prompt before the model reads it."""

    def rewrite(self, prompt: str) -> str: ...


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, architecture adapter and provenance.

    ``fingerprint`` identifies the weights as loaded (see :mod:`lmscalpel.models.fingerprint`);
    ``chat`` makes scoring and generation wrap prompts in the tokenizer's chat template;
    ``context_patches`` are the in-context patches currently applied, oldest first.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    name: str
    fingerprint: str
    path: Path | None = None
    chat: bool = False
    context_patches: list[Patch] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    def render_prompt(self, prompt: str) -> str:
        """``prompt`` as the model will read it, after every applied in-context patch."""
        for patch in self.context_patches:
            prompt = patch.rewriter.rewrite(prompt)
        return prompt

    def __repr__(self) -> str:
        return (
            f"LoadedModel(name={self.name!r}, model_type={self.model_type!r}, "
            f"layers={self.adapter.num_layers}, fingerprint={self.fingerprint!r})"
        )
