"""How applied in-context facts are written into a prompt, and what that costs in context.

The model reads, for every query::

    New Fact: <demo fact>           ┐
    Prompt: <demo query> <answer>   ┘ × k, least similar to the new fact first
                                    (a blank line between blocks)
    New Fact: <prompt> <target_new>
    Prompt: <query>

With the chat template on and ``chat_turns``, the demonstrations are earlier user/assistant turns
instead (:func:`render_messages`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lmscalpel.core.requests import EditRequestError
from lmscalpel.methods.ike.config import InContextConfig
from lmscalpel.methods.ike.demonstrations import Demonstration
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.rewriters import Message


class ContextOverflowError(EditRequestError):
    """An in-context edit would not fit the model's context (it is never silently truncated)."""


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


def render_for(
    lm: LoadedModel, facts: Sequence[StoredFact], query: str, settings: InContextConfig
) -> str | list[Message]:
    """What ``lm`` reads for ``query`` with ``facts`` shown: messages when it uses the chat
    template with ``chat_turns``, else text."""
    if lm.chat and settings.chat_turns:
        return render_messages(facts, query, settings.instruction)
    return render_text(facts, query, settings.instruction)


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


def needed_tokens(lm: LoadedModel, rendered: str | list[Message], settings: InContextConfig) -> int:
    """Context a rendered prompt needs: its tokens plus ``answer_tokens`` kept free (compare with
    ``lm.adapter.max_context``)."""
    return count_tokens(lm, rendered) + settings.answer_tokens
