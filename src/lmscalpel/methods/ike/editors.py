"""The in-context editors: ``ike-plain`` (the new fact only) and ``ike`` (after ``k`` retrieved
demonstrations). Both make patches of kind ``"context"`` whose state is the stored facts and the
rendering settings; the weights stay bit-identical."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from lmscalpel.core.config import ConfigError, MethodConfig
from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.base import Editor, register
from lmscalpel.methods.ike.config import IKEConfig, InContextConfig
from lmscalpel.methods.ike.demonstrations import demonstrations_for, fact_text
from lmscalpel.methods.ike.memory import FactMemory
from lmscalpel.methods.ike.pool import default_pool_path, load_pool
from lmscalpel.methods.ike.render import (
    ContextOverflowError,
    StoredFact,
    needed_tokens,
    render_for,
)
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch, PatchError
from lmscalpel.retrieval import load_encoder, most_similar

log = logging.getLogger(__name__)

SPARE_NEIGHBOURS = 8  # retrieved beyond k, to skip pool items that are the request itself


def _longest_query(request: EditRequest) -> str:
    return max((probe.prompt for probe in request.probes()), key=len)


def _fits(lm: LoadedModel, fact: StoredFact, query: str, settings: InContextConfig) -> bool:
    rendered = render_for(lm, [fact], query, settings)
    return needed_tokens(lm, rendered, settings) <= lm.adapter.max_context


@register
class PlainInContext(Editor):
    """IKE-plain: prepend ``New Fact: <prompt> <target_new>`` to every prompt, no demonstrations
    (the "PROMPT" baseline of Zheng et al. 2023 and EasyEdit)."""

    name: ClassVar[str] = "ike-plain"
    config_class: ClassVar[type[MethodConfig]] = InContextConfig
    citation: ClassVar[str] = (
        "Zheng et al. 2023, Can We Edit Factual Knowledge by In-Context Learning? (no demonstrations)"
    )
    kind: ClassVar[str] = "context"

    def stored_facts(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: InContextConfig
    ) -> tuple[list[StoredFact], dict[str, Any]]:
        """The facts to store for ``requests`` and the patch's info."""
        facts = [StoredFact(r.prompt, fact_text(r.prompt, r.target_new)) for r in requests]
        return facts, {}

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: InContextConfig
    ) -> Patch:
        facts, info = self.stored_facts(lm, requests, config)
        for request, fact in zip(requests, facts):
            self._check_fits(lm, fact, request, config)
        state = {"render": config.render_state(), "facts": [f.to_dict() for f in facts]}
        return Patch.in_context(lm, self.name, requests, state, config.to_dict(), info)

    @staticmethod
    def _check_fits(
        lm: LoadedModel, fact: StoredFact, request: EditRequest, settings: InContextConfig
    ) -> None:
        if _fits(lm, fact, _longest_query(request), settings):
            return
        n = len(fact.demonstrations)
        what = f"with {n} demonstrations" if n else "of the bare fact"
        raise ContextOverflowError(
            f"request {request.case_id if request.case_id is not None else request.prompt!r}: "
            f"the in-context edit {what} does not fit the model's context of "
            f"{lm.adapter.max_context} tokens (keeping {settings.answer_tokens} for the answer)"
            + ("; lower k, or leave it unset to use as many as fit" if n else "")
        )

    def build_rewriter(self, patches: Sequence[Patch], lm: LoadedModel) -> FactMemory:
        """One memory of all ``patches``' facts, rendered with the newest patch's settings."""
        facts: list[StoredFact] = []
        for patch in patches:
            state = patch.context_state or {}
            if "facts" not in state:
                raise PatchError(f"{patch!r} carries no facts; it was not made by {self.name}")
            facts.extend(StoredFact.from_dict(f) for f in state["facts"])
        newest = patches[-1].context_state.get("render", {})
        return FactMemory(facts, InContextConfig.from_render_state(newest), lm)


@register
class IKE(PlainInContext):
    """IKE (Zheng et al. 2023): the new fact after ``k`` retrieved copy / update / retain
    demonstrations (see :mod:`lmscalpel.methods.ike`)."""

    name: ClassVar[str] = "ike"
    config_class: ClassVar[type[MethodConfig]] = IKEConfig
    citation: ClassVar[str] = (
        "Zheng et al. 2023, Can We Edit Factual Knowledge by In-Context Learning? (EMNLP)"
    )

    def __init__(self, config=None, *, pool: Sequence[EditRequest] | None = None) -> None:
        """``pool`` (optional): demonstration pool as loaded requests, overriding ``config.pool``."""
        super().__init__(config)
        self._pool = list(pool) if pool is not None else None

    def _demonstration_pool(self, config: IKEConfig) -> tuple[list[EditRequest], str]:
        """The pool to draw from and a description of where it came from."""
        if self._pool is not None:
            pool = self._pool[: config.pool_size] if config.pool_size else self._pool
            pool = [p for p in pool if p.paraphrases and p.locality]
            return pool, f"{len(pool)} given requests"
        return load_pool(config.pool, config.pool_size), str(config.pool or default_pool_path())

    @staticmethod
    def _neighbours(
        requests: Sequence[EditRequest], pool: Sequence[EditRequest], wanted: int, encoder: str
    ) -> list[list[tuple[float, EditRequest]]]:
        """Per request, the ``wanted`` pool items most similar to its fact (most similar first,
        with their cosine similarity under ``encoder``), never the request itself."""
        if not wanted:
            return [[] for _ in requests]
        model = load_encoder(encoder)
        facts = [fact_text(r.prompt, r.target_new) for r in requests]
        keys = model.encode_cached([fact_text(p.prompt, p.target_new) for p in pool])
        scores, order = most_similar(model.encode(facts), keys, wanted + SPARE_NEIGHBOURS)
        neighbours = []
        for i, request in enumerate(requests):
            chosen = [
                (float(s), pool[j])
                for s, j in zip(scores[i].tolist(), order[i].tolist())
                if pool[j].prompt != request.prompt
            ]
            neighbours.append(chosen[:wanted])
        return neighbours

    def stored_facts(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: IKEConfig
    ) -> tuple[list[StoredFact], dict[str, Any]]:
        """Each request's fact with as many of its nearest demonstrations as wanted and fit."""
        wanted = config.max_k if config.k is None else config.k
        pool, source = self._demonstration_pool(config)
        if wanted > len(pool):
            if config.k is not None:
                raise ConfigError(f"IKEConfig.k = {config.k} but the pool holds {len(pool)} edits")
            wanted = len(pool)
        neighbours = self._neighbours(requests, pool, wanted, config.encoder)
        stored, ks, similarity = [], [], []
        for request, near in zip(requests, neighbours):
            fact = fact_text(request.prompt, request.target_new)
            k = len(near)
            while True:
                demos = demonstrations_for([item for _, item in near[:k]], config.shares)
                candidate = StoredFact(request.prompt, fact, tuple(demos))
                if _fits(lm, candidate, _longest_query(request), config):
                    break
                if config.k is not None or k == 0:
                    self._check_fits(lm, candidate, request, config)  # raises
                k -= 1
            if k < wanted:
                log.info("IKE: %d demonstrations fit the context for %r", k, request.prompt)
            stored.append(candidate)
            ks.append(k)
            similarity.append([round(s, 4) for s, _ in near[:k]])
        return stored, {"k": ks, "pool": source, "demo_similarity": similarity}
