"""The one entry point for editing: validate requests, run a method, return (and apply) a patch.

With ``guard=`` (:class:`~lmscalpel.guard.Guard`) the patch is applied, checked and kept only
when it meets the guard's bounds; otherwise it is rolled back and
:class:`~lmscalpel.guard.GuardRejected` says why (see :mod:`lmscalpel.guard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmscalpel.core.config import ConfigError, MethodConfig
from lmscalpel.core.requests import EditRequest, EditRequestError, as_requests
from lmscalpel.guard import Guard, guarded_apply
from lmscalpel.methods import Editor, get_editor
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch
from lmscalpel.tokens import SubjectNotFoundError, subject_token_positions


def validate_requests(lm: LoadedModel, requests: Sequence[EditRequest]) -> None:
    """Check every request against the model before anything is computed."""
    for i, request in enumerate(requests):
        where = f"request {i}" + (
            f" (case {request.case_id})" if request.case_id is not None else ""
        )
        try:
            request.check_fits(lm.tokenizer, lm.adapter.max_context)
            subject_token_positions(lm, request.prompt, request.subject)
        except (EditRequestError, SubjectNotFoundError) as error:
            raise EditRequestError(f"{where}: {error}") from None


def edit(
    lm: LoadedModel,
    requests: EditRequest | Sequence[EditRequest],
    method: str | Editor = "ft-l",
    config: MethodConfig | dict[str, Any] | str | Path | None = None,
    *,
    apply: bool = True,
    guard: Guard | None = None,
) -> Patch:
    """Edit ``lm`` so that each request's prompt continues with its ``target_new``.

    ``method`` is a registered name (with ``config``) or an :class:`Editor` instance (which
    carries its own config). All requests are validated first; the method computes a :class:`Patch` without changing the
    model; with ``apply`` (the default) the patch is then applied whole. Revert it with
    ``patch.revert()``.

    With a ``guard`` the patch is applied and measured (reliability on the requests, generalization
    on their paraphrases, locality on their locality probes and the guard's general prompts); a
    missed bound reverts it and raises :class:`~lmscalpel.guard.GuardRejected` (its ``report``
    holds the numbers; the model is unchanged). A kept patch carries the report in
    ``patch.info["guard"]``. With ``apply=False`` as well, a patch that passes is reverted
    again before it is returned (a dry run).
    """
    requests = as_requests(requests)
    validate_requests(lm, requests)
    if isinstance(method, Editor):
        if config is not None:
            raise ConfigError("give the config to the Editor instance, not to edit() as well")
        editor = method
    else:
        editor = get_editor(method, config)
    if guard is not None and not isinstance(guard, Guard):
        raise ConfigError(f"guard must be a lmscalpel.guard.Guard, got {type(guard).__name__}")
    patch = editor.compute(lm, requests, editor.config_for(lm))
    if guard is not None:
        guarded_apply(lm, patch, guard)
        if not apply:
            patch.revert()
    elif apply:
        patch.apply(lm)
    return patch
