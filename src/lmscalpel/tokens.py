"""How text becomes token ids: prompt rendering, BOS, chat templates, targets' leading space, and
where the subject sits among a prompt's tokens. Scoring, editing and evaluation all go through here,
so a target is tokenized the same way when it is trained and when it is measured.
"""

from __future__ import annotations

from lmscalpel.models.loaded import LoadedModel


class SubjectNotFoundError(ValueError):
    """The subject does not occur in the prompt."""


def format_prompt(lm: LoadedModel, prompt: str) -> str:
    """The text the model reads for ``prompt``: in-context patches applied, then the chat template
    when ``lm.chat`` is set."""
    if not lm.chat:
        return lm.render_prompt(prompt)
    return lm.tokenizer.apply_chat_template(
        lm.render_chat(prompt), tokenize=False, add_generation_prompt=True
    )


def encode_prompt(lm: LoadedModel, prompt: str) -> list[int]:
    """Token ids of the formatted prompt, with BOS exactly when the tokenizer adds one."""
    text = format_prompt(lm, prompt)
    return lm.tokenizer(text, add_special_tokens=not lm.chat)["input_ids"]


def target_text(prompt_text: str, target: str, chat: bool = False) -> str:
    """The target as it continues the prompt: ``"Paris"`` after ``"... city of"`` is ``" Paris"``.

    A target that already starts with white space, or a prompt that ends with it, is left alone; a
    chat answer starts a fresh turn and gets no space.
    """
    if chat:
        return target.lstrip()
    if not target or target[0].isspace() or not prompt_text or prompt_text[-1].isspace():
        return target
    return " " + target


def encode_target(lm: LoadedModel, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as the continuation of ``prompt`` (never with special tokens)."""
    text = target_text(format_prompt(lm, prompt), target, lm.chat)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return ids


def subject_token_positions(
    lm: LoadedModel, prompt: str, subject: str, search_from: int = 0
) -> list[int]:
    """Indices, in :func:`encode_prompt` ``(prompt)``, of the tokens that overlap the first
    occurrence of ``subject`` in ``prompt`` at or after character ``search_from``."""
    start = prompt.find(subject, search_from)
    if start < 0 or not subject:
        raise SubjectNotFoundError(f"subject {subject!r} not found in prompt {prompt!r}")
    text = format_prompt(lm, prompt)
    offset = text.rfind(prompt)
    if offset < 0:
        raise SubjectNotFoundError(f"prompt {prompt!r} does not survive formatting: {text!r}")
    begin, end = offset + start, offset + start + len(subject)
    encoded = lm.tokenizer(text, add_special_tokens=not lm.chat, return_offsets_mapping=True)
    positions = [
        i
        for i, (lo, hi) in enumerate(encoded["offset_mapping"])
        if hi > lo and lo < end and hi > begin
    ]
    if not positions:
        raise SubjectNotFoundError(f"subject {subject!r} maps to no token of {prompt!r}")
    return positions


def subject_last_token(lm: LoadedModel, prompt: str, subject: str) -> int:
    """Index of the subject's last token in :func:`encode_prompt` ``(prompt)``."""
    return subject_token_positions(lm, prompt, subject)[-1]
