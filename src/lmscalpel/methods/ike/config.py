"""The configurations of the in-context editors.

:class:`InContextConfig` is how applied facts are rendered into the prompt: the whole of
``ike-plain``'s configuration, and what an in-context patch keeps (its ``context_state["render"]``)
to render itself later. :class:`IKEConfig` *is* those settings plus how IKE chooses its
demonstrations; it derives from :class:`InContextConfig`, so each field exists once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmscalpel.core.config import ConfigError, MethodConfig, option
from lmscalpel.retrieval import DEFAULT_ENCODER

PAPER_K = 32  # Zheng et al. 2023 use 32 demonstrations
DEFAULT_POOL = "counterfact/train.json"  # relative to the shared data folder


@dataclass
class InContextConfig(MethodConfig):
    """How applied in-context facts are rendered (``ike-plain``'s hyperparameters, and the
    rendering part of IKE's). With the chat template on, ``instruction`` is a system message and,
    with ``chat_turns``, demonstrations become earlier user/assistant turns."""

    instruction: str = option("", "an optional first line of every context (chat: system message)")
    retrieve: int = option(
        1, "applied facts shown per prompt (the most similar to it)", at_least=1, at_most=10_000
    )
    answer_tokens: int = option(
        16,
        "context kept free for the answer; a prompt leaving less fails",
        at_least=1,
        at_most=10**7,
    )
    encoder: str = option(
        DEFAULT_ENCODER,
        "sentence-transformers encoder for retrieval (bundled name or a folder)",
        nonempty=True,
        path=True,
    )
    chat_turns: bool = option(
        True, "chat template: demonstrations as earlier turns (False: all in one user message)"
    )

    def render_state(self) -> dict[str, Any]:
        """The rendering settings alone (an :class:`IKEConfig` without its demonstration fields),
        as an in-context patch stores them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(InContextConfig)}

    @staticmethod
    def from_render_state(state: dict[str, Any]) -> InContextConfig:
        """The settings a patch stored with :meth:`render_state` (missing keys: defaults)."""
        return InContextConfig.from_dict(dict(state), where="the patch's render settings")


@dataclass
class IKEConfig(InContextConfig):
    """Hyperparameters of IKE: the rendering settings (inherited) plus the demonstrations.

    ``k`` unset takes ``max_k`` or, if fewer fit the model's context, as many as fit; an explicit
    ``k`` that does not fit raises :class:`~lmscalpel.methods.ike.ContextOverflowError`. ``pool``
    unset reads ``counterfact/train.json`` in the shared data folder (``$LMSCALPEL_DATA`` or
    ``../shared/data`` beside the project).
    """

    k: int | None = option(
        None,
        "demonstrations per fact; unset: max_k, or as many as fit",
        at_least=0,
        at_most=100_000,
    )
    max_k: int = option(
        PAPER_K,
        "the most demonstrations an unset k takes (the paper's 32)",
        at_least=0,
        at_most=100_000,
    )
    copy_share: float = option(
        1.0, "share of copy demonstrations (the pool fact's own prompt)", at_least=0, at_most=1e6
    )
    update_share: float = option(
        1.0, "share of update demonstrations (a paraphrase of it)", at_least=0, at_most=1e6
    )
    retain_share: float = option(
        4.0, "share of retain demonstrations (an unrelated prompt)", at_least=0, at_most=1e6
    )
    pool: str | None = option(
        None,
        "the demonstration pool: any dataset file; unset: CounterFact's train split",
        nonempty=True,
        path=True,
    )
    pool_size: int | None = option(
        None, "use only the pool's first records (unset: all)", at_least=1
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        shares = self.shares
        if sum(shares) <= 0:
            raise ConfigError(
                f"{type(self).__name__}: copy_share, update_share and retain_share must not "
                f"all be 0, got {shares}"
            )

    @property
    def shares(self) -> tuple[float, float, float]:
        """The (copy, update, retain) proportions."""
        return (self.copy_share, self.update_share, self.retain_share)
