"""In-context knowledge editing: IKE and its plain variant. No weight changes.

IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?", EMNLP) edits a
fact by putting it in the model's context, preceded by ``k`` demonstrations that teach the model
how to use a new fact. The model reads, for every query::

    New Fact: <demo fact>           ┐
    Prompt: <demo query> <answer>   ┘ × k, least similar to the new fact first
                                    (a blank line between blocks)
    New Fact: <prompt> <target_new>
    Prompt: <query>

Each demonstration comes from a training pool of edits (CounterFact's training split by default)
and is one of three kinds:

* **copy** — the query is the pool fact's own prompt; the answer is its new target;
* **update** — the query is a paraphrase of the pool fact's prompt; the answer is its new target;
* **retain** — the query is an unrelated (locality) prompt; the answer is its unchanged old one,
  which teaches the model to *ignore* the new fact where it does not apply.

The ``k`` pool facts most similar to the new fact (cosine similarity of all-MiniLM-L6-v2 sentence
embeddings, :mod:`lmscalpel.retrieval`) become the demonstrations, the most similar nearest the
query; their kinds are interleaved in the configured proportions. ``k`` defaults to the paper's 32,
fewer when that does not fit the model's context; a context that would overflow is a
:class:`ContextOverflowError`, never silently truncated.

``ike-plain`` only prepends the new fact (``New Fact: ... Prompt: ...``), so the value of the
demonstrations can be measured.

Both make patches of kind ``"context"``: a memory of facts (with their demonstrations) that
:meth:`~lmscalpel.models.LoadedModel.render_prompt` applies to every prompt while the patch is
applied; the weights stay bit-identical. All applied patches of a method form one memory: for
each prompt the ``retrieve`` stored facts most similar to it are shown (the most similar with its
demonstrations), so sequential editing of thousands of facts never outgrows the context. With the
chat template on (``load_model(chat=True)``), demonstrations become earlier user/assistant turns.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from lmscalpel.core.config import ConfigError, MethodConfig
from lmscalpel.core.requests import EditRequest, EditRequestError
from lmscalpel.data.datasets import read_dataset
from lmscalpel.methods.base import Editor, register
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.rewriters import Message
from lmscalpel.patch import Patch, PatchError
from lmscalpel.retrieval import DEFAULT_ENCODER, load_encoder, most_similar
from lmscalpel.tokens import target_text

log = logging.getLogger(__name__)

DEMONSTRATION_KINDS = ("copy", "update", "retain")
PAPER_K = 32  # Zheng et al. 2023 use 32 demonstrations
DEFAULT_POOL = "counterfact/train.json"  # relative to the shared data folder


class ContextOverflowError(EditRequestError):
    """An in-context edit would not fit the model's context (it is never silently truncated)."""


# ---- configuration -----------------------------------------------------------------------------
@dataclass
class InContextConfig(MethodConfig):
    """Hyperparameters of ``ike-plain`` (and the rendering part of IKE's).

    ``instruction``: an optional first line (a system message with the chat template).
    ``retrieve``: with many applied facts, how many (most similar to the prompt) are shown.
    ``answer_tokens``: context kept free for the answer; a prompt that leaves less is an error.
    ``encoder``: sentence-transformers encoder for retrieval (bundled all-MiniLM-L6-v2 or a folder).
    ``chat_turns``: with the chat template, demonstrations as earlier user/assistant turns (else
    everything in one user message).
    """

    instruction: str = ""
    retrieve: int = 1
    answer_tokens: int = 16
    encoder: str = DEFAULT_ENCODER
    chat_turns: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retrieve < 1:
            raise ConfigError(f"{type(self).__name__}.retrieve must be at least 1")
        if self.answer_tokens < 1:
            raise ConfigError(f"{type(self).__name__}.answer_tokens must be at least 1")


@dataclass
class IKEConfig(InContextConfig):
    """Hyperparameters of IKE.

    ``k``: demonstrations per fact; ``None`` takes ``max_k`` or, if fewer fit the model's context,
    as many as fit. An explicit ``k`` that does not fit raises :class:`ContextOverflowError`.
    ``copy_share`` / ``update_share`` / ``retain_share``: proportions of the three kinds.
    ``pool``: the demonstration pool, any dataset file the evaluation reads (``None``: ``counterfact/train.json`` in the shared data folder, ``$LMSCALPEL_DATA`` or
    ``../shared/data`` beside the project); ``pool_size``: use only its first records.
    """

    k: int | None = None
    max_k: int = PAPER_K
    copy_share: float = 1.0
    update_share: float = 1.0
    retain_share: float = 4.0
    pool: str | None = None
    pool_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.k is not None and self.k < 0:
            raise ConfigError(f"{name}.k must be at least 0 (or None for as many as fit)")
        if self.max_k < 0:
            raise ConfigError(f"{name}.max_k must be at least 0")
        shares = (self.copy_share, self.update_share, self.retain_share)
        if min(shares) < 0 or sum(shares) <= 0:
            raise ConfigError(f"{name}: the kind shares must be >= 0 and not all 0, got {shares}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError(f"{name}.pool_size must be at least 1")


# ---- demonstrations ----------------------------------------------------------------------------
def fact_text(prompt: str, target: str) -> str:
    """A fact as one sentence: ``"The Eiffel Tower is located in the city of Rome"``."""
    return prompt + target_text(prompt, target)


@dataclass(frozen=True)
class Demonstration:
    """One worked example: a fact, a query and the answer the model should give."""

    kind: str
    fact: str
    query: str
    answer: str

    def text(self) -> str:
        return f"New Fact: {self.fact}\nPrompt: {fact_text(self.query, self.answer)}"


def make_demonstration(item: EditRequest, kind: str) -> Demonstration:
    """The ``kind`` demonstration (copy, update or retain) built from pool edit ``item``."""
    fact = fact_text(item.prompt, item.target_new)
    if kind == "copy":
        return Demonstration(kind, fact, item.prompt, item.target_new)
    if kind == "update":
        if not item.paraphrases:
            raise EditRequestError(f"pool item {item.case_id!r} has no paraphrase for an update")
        return Demonstration(kind, fact, item.paraphrases[0], item.target_new)
    if kind == "retain":
        if not item.locality:
            raise EditRequestError(f"pool item {item.case_id!r} has no locality prompt to retain")
        probe = item.locality[0]
        return Demonstration(kind, fact, probe.prompt, probe.answer)
    raise ValueError(f"unknown demonstration kind {kind!r}; use one of {DEMONSTRATION_KINDS}")


def kind_schedule(k: int, shares: Sequence[float]) -> list[str]:
    """Kinds for ``k`` demonstrations in the given proportions, interleaved so that every prefix
    keeps them as well as it can (ties go to copy, then update, then retain)."""
    total = sum(shares)
    quotas = [k * s / total for s in shares]
    counts = [int(q) for q in quotas]  # largest remainder: exact totals
    by_remainder = sorted(range(3), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: k - sum(counts)]:
        counts[i] += 1
    used = [0, 0, 0]
    kinds = []
    for position in range(k):
        lag = [
            counts[i] * (position + 1) / k - used[i] if used[i] < counts[i] else -1e9
            for i in range(3)
        ]
        pick = max(range(3), key=lambda i: (lag[i], -i))
        used[pick] += 1
        kinds.append(DEMONSTRATION_KINDS[pick])
    return kinds


def demonstrations_for(
    neighbours: Sequence[EditRequest], shares: Sequence[float]
) -> list[Demonstration]:
    """Demonstrations from pool items ordered most similar first, returned in context order
    (least similar first, so the most similar sits next to the query)."""
    kinds = kind_schedule(len(neighbours), shares)
    demos = [make_demonstration(item, kind) for item, kind in zip(neighbours, kinds)]
    return demos[::-1]


# ---- the pool ----------------------------------------------------------------------------------
def shared_data_dir() -> Path:
    """``$LMSCALPEL_DATA``, or the ``shared/data`` folder beside the project's checkout."""
    if os.environ.get("LMSCALPEL_DATA"):
        return Path(os.environ["LMSCALPEL_DATA"]).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def default_pool_path() -> Path:
    return shared_data_dir() / DEFAULT_POOL


@functools.lru_cache(maxsize=4)
def _read_pool(path: Path, mtime: float) -> tuple[EditRequest, ...]:
    cases = read_dataset(path).cases
    return tuple(r for case in cases for r in case.requests if r.paraphrases and r.locality)


def load_pool(path: str | os.PathLike | None = None, size: int | None = None) -> list[EditRequest]:
    """The demonstration pool: edits with at least one paraphrase and one locality probe.

    ``path`` is any dataset :func:`lmscalpel.evaluation.read_dataset` reads (CounterFact in either
    layout, zsRE, KnowEdit, lmscalpel requests...); ``None`` reads the default pool (see
    :class:`IKEConfig`). ``size`` keeps the first records only.
    """
    resolved = Path(path).expanduser() if path is not None else default_pool_path()
    if not resolved.is_file():
        hint = (
            "set the IKE config's `pool` to a dataset file (e.g. CounterFact's train.json), or "
            "LMSCALPEL_DATA to the folder holding counterfact/train.json"
        )
        raise FileNotFoundError(f"IKE demonstration pool not found at {resolved}: {hint}")
    resolved = resolved.resolve()
    pool = list(_read_pool(resolved, resolved.stat().st_mtime))
    if not pool:
        raise EditRequestError(f"{resolved} holds no edit with a paraphrase and a locality probe")
    return pool[:size] if size else pool


# ---- rendering ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredFact:
    """One applied fact: its request prompt (the retrieval key), its sentence and demonstrations."""

    prompt: str
    fact: str
    demonstrations: tuple[Demonstration, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "fact": self.fact,
            "demonstrations": [asdict(d) for d in self.demonstrations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredFact:
        demos = tuple(Demonstration(**d) for d in data.get("demonstrations", ()))
        return cls(prompt=data["prompt"], fact=data["fact"], demonstrations=demos)


@dataclass(frozen=True)
class RenderSettings:
    """How a memory of facts is rendered (the rendering fields of :class:`InContextConfig`)."""

    instruction: str = ""
    retrieve: int = 1
    answer_tokens: int = 16
    encoder: str = DEFAULT_ENCODER
    chat_turns: bool = True

    @classmethod
    def from_config(cls, config: InContextConfig) -> RenderSettings:
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


def render_text(facts: Sequence[StoredFact], query: str, instruction: str = "") -> str:
    """The plain-text context for ``query``: the last (most relevant) fact's demonstrations, the
    facts, the query."""
    blocks = [instruction] if instruction else []
    if facts:
        blocks.extend(d.text() for d in facts[-1].demonstrations)
    new = "".join(f"New Fact: {f.fact}\n" for f in facts)
    blocks.append(f"{new}Prompt: {query}")
    return "\n\n".join(blocks)


def render_messages(
    facts: Sequence[StoredFact], query: str, instruction: str = "", before: Sequence[Message] = ()
) -> list[Message]:
    """The chat form of :func:`render_text`: demonstrations as earlier user/assistant turns."""
    messages = list(before)
    if instruction:
        messages.insert(0, {"role": "system", "content": instruction})
    for demo in facts[-1].demonstrations if facts else ():
        messages.append({"role": "user", "content": f"New Fact: {demo.fact}\nPrompt: {demo.query}"})
        messages.append({"role": "assistant", "content": demo.answer})
    new = "".join(f"New Fact: {f.fact}\n" for f in facts)
    messages.append({"role": "user", "content": f"{new}Prompt: {query}"})
    return messages


def count_tokens(lm: LoadedModel, text_or_messages: str | list[Message]) -> int:
    """Tokens the model reads for a rendered prompt (with the chat template for messages)."""
    if isinstance(text_or_messages, str) and not lm.chat:
        return len(lm.tokenizer(text_or_messages)["input_ids"])
    if isinstance(text_or_messages, str):
        text_or_messages = [{"role": "user", "content": text_or_messages}]
    text = lm.tokenizer.apply_chat_template(
        text_or_messages, tokenize=False, add_generation_prompt=True
    )
    return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


class FactMemory:
    """The prompt rewriter of all applied in-context patches of one method.

    For each prompt it retrieves the ``retrieve`` stored facts most similar to it (all of them when
    there are no more than that; the encoder is then never loaded) and renders them, the most
    similar last and with its demonstrations. Results are memoised per prompt.
    """

    def __init__(self, facts: Sequence[StoredFact], settings: RenderSettings, lm: LoadedModel):
        if not facts:
            raise PatchError("an in-context patch without facts")
        self.facts = list(facts)
        self.settings = settings
        self.lm = lm
        self._keys = None
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
        n = count_tokens(self.lm, rendered)
        limit = self.lm.adapter.max_context
        if n + self.settings.answer_tokens > limit:
            raise ContextOverflowError(
                f"the in-context edit for prompt {prompt[:60]!r} needs {n} tokens plus "
                f"{self.settings.answer_tokens} for the answer, more than the model's context of "
                f"{limit}; use fewer demonstrations (k) or retrieved facts (retrieve)"
            )

    def _memoised(self, key: Any, build) -> Any:
        if key not in self._memo:
            if len(self._memo) > 10_000:
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


# ---- the editors -------------------------------------------------------------------------------
def _longest_query(request: EditRequest) -> str:
    queries = [request.prompt, *request.paraphrases, *(p.prompt for p in request.locality)]
    queries += [p.prompt for p in request.portability]
    return max(queries, key=len)


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
        facts = [StoredFact(r.prompt, fact_text(r.prompt, r.target_new)) for r in requests]
        return facts, {}

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: InContextConfig
    ) -> Patch:
        facts, info = self.stored_facts(lm, requests, config)
        settings = RenderSettings.from_config(config)
        for request, fact in zip(requests, facts):
            self._check_fits(lm, fact, request, settings)
        state = {"render": asdict(settings), "facts": [f.to_dict() for f in facts]}
        return Patch.in_context(lm, self.name, requests, state, config.to_dict(), info)

    @staticmethod
    def _fits(lm: LoadedModel, fact: StoredFact, query: str, settings: RenderSettings) -> bool:
        rendered: str | list[Message]
        if lm.chat and settings.chat_turns:
            rendered = render_messages([fact], query, settings.instruction)
        else:
            rendered = render_text([fact], query, settings.instruction)
        return count_tokens(lm, rendered) + settings.answer_tokens <= lm.adapter.max_context

    def _check_fits(
        self, lm: LoadedModel, fact: StoredFact, request: EditRequest, settings: RenderSettings
    ) -> None:
        if self._fits(lm, fact, _longest_query(request), settings):
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
        facts: list[StoredFact] = []
        for patch in patches:
            state = patch.context_state or {}
            if "facts" not in state:
                raise PatchError(f"{patch!r} carries no facts; it was not made by {self.name}")
            facts.extend(StoredFact.from_dict(f) for f in state["facts"])
        newest = patches[-1].context_state.get("render", {})
        return FactMemory(facts, RenderSettings(**newest), lm)


@register
class IKE(PlainInContext):
    """IKE: the new fact after ``k`` retrieved copy / update / retain demonstrations (module doc)."""

    name: ClassVar[str] = "ike"
    config_class: ClassVar[type[MethodConfig]] = IKEConfig
    citation: ClassVar[str] = (
        "Zheng et al. 2023, Can We Edit Factual Knowledge by In-Context Learning? (EMNLP)"
    )

    def __init__(self, config=None, *, pool: Sequence[EditRequest] | None = None) -> None:
        """``pool`` (optional): demonstration pool as loaded requests, overriding ``config.pool``."""
        super().__init__(config)
        self._pool = list(pool) if pool is not None else None

    def stored_facts(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: IKEConfig
    ) -> tuple[list[StoredFact], dict[str, Any]]:
        wanted = config.max_k if config.k is None else config.k
        settings = RenderSettings.from_config(config)
        shares = (config.copy_share, config.update_share, config.retain_share)
        if self._pool is not None:
            pool = self._pool[: config.pool_size] if config.pool_size else self._pool
            pool = [p for p in pool if p.paraphrases and p.locality]
            source = f"{len(pool)} given requests"
        else:
            pool = load_pool(config.pool, config.pool_size)
            source = str(config.pool or default_pool_path())
        if wanted > len(pool):
            if config.k is not None:
                raise ConfigError(f"IKEConfig.k = {config.k} but the pool holds {len(pool)} edits")
            wanted = len(pool)
        facts = [fact_text(r.prompt, r.target_new) for r in requests]
        neighbours: list[list[tuple[float, EditRequest]]] = [[] for _ in requests]
        if wanted:
            encoder = load_encoder(config.encoder)
            keys = encoder.encode_cached([fact_text(p.prompt, p.target_new) for p in pool])
            # a few spare neighbours, to skip pool items that are the request itself
            scores, order = most_similar(encoder.encode(facts), keys, wanted + 8)
            for i, request in enumerate(requests):
                chosen = [
                    (float(s), pool[j])
                    for s, j in zip(scores[i].tolist(), order[i].tolist())
                    if pool[j].prompt != request.prompt
                ]
                neighbours[i] = chosen[:wanted]
        stored, ks, similarity = [], [], []
        for request, fact, near in zip(requests, facts, neighbours):
            k = len(near)
            while True:
                demos = demonstrations_for([item for _, item in near[:k]], shares)
                candidate = StoredFact(request.prompt, fact, tuple(demos))
                if self._fits(lm, candidate, _longest_query(request), settings):
                    break
                if config.k is not None or k == 0:
                    self._check_fits(lm, candidate, request, settings)  # raises
                k -= 1
            if k < wanted:
                log.info("IKE: %d demonstrations fit the context for %r", k, request.prompt)
            stored.append(candidate)
            ks.append(k)
            similarity.append([round(s, 4) for s, _ in near[:k]])
        return stored, {"k": ks, "pool": source, "demo_similarity": similarity}
