"""The model handle every part of lmscalpel passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmscalpel.models.adapter import ModelAdapter
from lmscalpel.models.placement import input_device
from lmscalpel.models.rewriters import ContextPatch, Message, PromptRewriter, rewriter_builder


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, architecture adapter and provenance.

    ``fingerprint`` identifies the weights as loaded (see :mod:`lmscalpel.models.fingerprint`);
    ``chat`` makes scoring and generation wrap prompts in the tokenizer's chat template;
    ``context_patches`` are the in-context patches currently applied, oldest first; all those of
    one method are realised together by one rewriter (see :meth:`rewriters` and
    :mod:`lmscalpel.models.rewriters`).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    name: str
    fingerprint: str
    path: Path | None = None
    chat: bool = False
    context_patches: list[ContextPatch] = field(default_factory=list)
    _rewriter_cache: tuple[tuple[ContextPatch, ...], list[PromptRewriter]] = field(
        default_factory=lambda: ((), []), repr=False, compare=False
    )

    @property
    def device(self) -> torch.device:
        """Where inputs go (for a model dispatched by accelerate: its embeddings' device)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def model_type(self) -> str:
        return self.adapter.model_type

    def rewriters(self) -> list[PromptRewriter]:
        """One rewriter per in-context method, built from *all* its applied patches at once.

        Many applied patches of one method are rendered once, together (the method decides how,
        e.g. IKE retrieves the stored facts relevant to each prompt), instead of nesting one
        rewriter inside another. Methods come in the order of their oldest applied patch. Rebuilt
        only when the applied patches change.
        """
        applied = tuple(self.context_patches)
        cached, rewriters = self._rewriter_cache
        if len(cached) != len(applied) or any(a is not b for a, b in zip(cached, applied)):
            by_method: dict[str, list[ContextPatch]] = {}
            for patch in applied:
                by_method.setdefault(patch.method, []).append(patch)
            rewriters = [
                rewriter_builder(method)(patches, self) for method, patches in by_method.items()
            ]
            self._rewriter_cache = (applied, rewriters)
        return rewriters

    def render_prompt(self, prompt: str) -> str:
        """``prompt`` as the model will read it, after every applied in-context patch."""
        for rewriter in self.rewriters():
            prompt = rewriter.rewrite(prompt)
        return prompt

    def render_chat(self, prompt: str) -> list[Message]:
        """``prompt`` as the chat conversation the model reads (before its chat template)."""
        messages = [{"role": "user", "content": prompt}]
        for rewriter in self.rewriters():
            rewrite_chat = getattr(rewriter, "rewrite_chat", None)
            if rewrite_chat is not None:
                messages = rewrite_chat(messages)
            else:
                last = messages[-1]
                messages = [*messages[:-1], {**last, "content": rewriter.rewrite(last["content"])}]
        return messages

    def __repr__(self) -> str:
        return (
            f"LoadedModel(name={self.name!r}, model_type={self.model_type!r}, "
            f"layers={self.adapter.num_layers}, fingerprint={self.fingerprint!r})"
        )
