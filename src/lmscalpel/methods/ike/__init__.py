"""In-context knowledge editing: IKE and its plain variant. No weight changes.

IKE (Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context Learning?", EMNLP) edits a
fact by putting it in the model's context, preceded by ``k`` demonstrations that teach the model
how to use a new fact (:mod:`~lmscalpel.methods.ike.render` shows the layout). Each demonstration
comes from a training pool of edits (CounterFact's training split by default,
:mod:`~lmscalpel.methods.ike.pool`) and is a *copy*, *update* or *retain* example
(:mod:`~lmscalpel.methods.ike.demonstrations`).

The ``k`` pool facts most similar to the new fact (cosine similarity of all-MiniLM-L6-v2 sentence
embeddings, :mod:`lmscalpel.retrieval`) become the demonstrations, the most similar nearest the
query; their kinds are interleaved in the configured proportions. ``k`` defaults to the paper's 32,
fewer when that does not fit the model's context; a context that would overflow is a
:class:`ContextOverflowError`, never silently truncated.

``ike-plain`` only prepends the new fact (``New Fact: ... Prompt: ...``), so the value of the
demonstrations can be measured.

Both make patches of kind ``"context"`` (:mod:`~lmscalpel.methods.ike.editors`): a memory of facts
(with their demonstrations, :mod:`~lmscalpel.methods.ike.memory`) that
:meth:`~lmscalpel.models.LoadedModel.render_prompt` applies to every prompt while the patch is
applied; the weights stay bit-identical. All applied patches of a method form one memory: for
each prompt the ``retrieve`` stored facts most similar to it are shown (the most similar with its
demonstrations), so sequential editing of thousands of facts never outgrows the context. With the
chat template on (``load_model(chat=True)``), demonstrations become earlier user/assistant turns.

Modules: ``config`` (the two configurations), ``demonstrations``, ``pool``, ``render`` (the
layout and its token count), ``memory`` (the prompt rewriter), ``editors``.
"""

from lmscalpel.data.shared import shared_data_dir
from lmscalpel.methods.ike.config import DEFAULT_POOL, PAPER_K, IKEConfig, InContextConfig
from lmscalpel.methods.ike.demonstrations import (
    DEMONSTRATION_KINDS,
    Demonstration,
    demonstrations_for,
    fact_text,
    kind_schedule,
    make_demonstration,
)
from lmscalpel.methods.ike.editors import IKE, PlainInContext
from lmscalpel.methods.ike.memory import FactMemory
from lmscalpel.methods.ike.pool import default_pool_path, load_pool
from lmscalpel.methods.ike.render import (
    ContextOverflowError,
    StoredFact,
    count_tokens,
    render_messages,
    render_text,
)

__all__ = [
    "DEFAULT_POOL",
    "DEMONSTRATION_KINDS",
    "IKE",
    "PAPER_K",
    "ContextOverflowError",
    "Demonstration",
    "FactMemory",
    "IKEConfig",
    "InContextConfig",
    "PlainInContext",
    "StoredFact",
    "count_tokens",
    "default_pool_path",
    "demonstrations_for",
    "fact_text",
    "kind_schedule",
    "load_pool",
    "make_demonstration",
    "render_messages",
    "render_text",
    "shared_data_dir",
]
