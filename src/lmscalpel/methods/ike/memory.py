"""The memory of applied in-context facts: the one prompt rewriter of all of a method's patches.

All applied patches of a method form one memory: for each prompt the ``retrieve`` stored facts
most similar to it (sentence-embedding cosine similarity, :mod:`lmscalpel.retrieval`) are shown,
the most similar last and with its demonstrations, so sequential editing of thousands of facts
never outgrows the context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lmscalpel.methods.ike.config import InContextConfig
from lmscalpel.methods.ike.render import (
    ContextOverflowError,
    StoredFact,
    needed_tokens,
    render_messages,
    render_text,
)
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.rewriters import Message
from lmscalpel.patch import PatchError
from lmscalpel.retrieval import load_encoder, most_similar

MEMO_LIMIT = 10_000  # rendered prompts kept per memory before the memo starts again


class FactMemory:
    """The prompt rewriter of all applied in-context patches of one method.

    For each prompt it retrieves the ``settings.retrieve`` stored facts most similar to it (all of
    them when there are no more than that; the encoder is then never loaded) and renders them, the
    most similar last and with its demonstrations. Results are memoised per prompt.
    """

    def __init__(
        self, facts: Sequence[StoredFact], settings: InContextConfig, lm: LoadedModel
    ) -> None:
        if not facts:
            raise PatchError("an in-context patch without facts")
        self.facts = list(facts)
        self.settings = settings
        self.lm = lm
        self._keys: torch.Tensor | None = None  # (n_facts, d) embeddings of the facts' prompts
        self._memo: dict[Any, Any] = {}

    def relevant(self, prompt: str) -> list[StoredFact]:
        """The facts shown for ``prompt``, least similar first."""
        if len(self.facts) <= self.settings.retrieve:
            return self.facts
        encoder = load_encoder(self.settings.encoder)
        if self._keys is None:
            self._keys = encoder.encode([f.prompt for f in self.facts])
        _, order = most_similar(encoder.encode([prompt])[0], self._keys, self.settings.retrieve)
        return [self.facts[i] for i in reversed(order.tolist())]

    def _check(self, rendered: str | list[Message], prompt: str) -> None:
        n = needed_tokens(self.lm, rendered, self.settings)
        limit = self.lm.adapter.max_context
        if n > limit:
            raise ContextOverflowError(
                f"the in-context edit for prompt {prompt[:60]!r} needs "
                f"{n - self.settings.answer_tokens} tokens plus {self.settings.answer_tokens} "
                f"for the answer, more than the model's context of {limit}; use fewer "
                "demonstrations (k) or retrieved facts (retrieve)"
            )

    def _memoised(self, key: Any, build: Callable[[], Any]) -> Any:
        if key not in self._memo:
            if len(self._memo) > MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = build()
        return self._memo[key]

    def rewrite(self, prompt: str) -> str:
        def build() -> str:
            text = render_text(self.relevant(prompt), prompt, self.settings.instruction)
            self._check(text, prompt)
            return text

        return self._memoised(prompt, build)

    def rewrite_chat(self, messages: list[Message]) -> list[Message]:
        prompt = messages[-1]["content"]
        if not self.settings.chat_turns:
            return [*messages[:-1], {**messages[-1], "content": self.rewrite(prompt)}]

        def build() -> list[Message]:
            out = render_messages(
                self.relevant(prompt), prompt, self.settings.instruction, messages[:-1]
            )
            self._check(out, prompt)
            return out

        key = tuple((m["role"], m["content"]) for m in messages)
        return [dict(m) for m in self._memoised(key, build)]
