"""The editing service without HTTP: one model, its journal, a lock, and what each endpoint does.

:class:`EditingService` is what the FastAPI app (:mod:`lmscalpel.service.app`) calls; a Python
user can drive it directly. Readers (generate, score, completions) share the model under a
readers-writer lock; edits and reverts hold it alone, so no reader sees a half-applied patch.
Causal traces hook the model they run on, so they run on a private copy of the served model.
Every answer carries the journal state it was computed under, read inside the same lock.

Failures are :class:`ServiceError` with an HTTP status, a type, a one-line message and, for
invalid input, the field: the library's own errors are mapped here (bad requests, configs and
guards are 422; a failed edit is 400 with the library's message; a refused revert is 409).
"""

from __future__ import annotations

import base64
import copy
import difflib
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmscalpel.core.config import ConfigError
from lmscalpel.core.requests import EditRequest, EditRequestError, Probe
from lmscalpel.core.version import __version__
from lmscalpel.editing import edit
from lmscalpel.guard import Guard, GuardRejected
from lmscalpel.locate import TracingError, trace
from lmscalpel.locate.plots import plot_trace, plot_traces
from lmscalpel.methods import available_methods, get_editor
from lmscalpel.models.adapter import ModelAdapter
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch, PatchError
from lmscalpel.report import ProbeResult, probe
from lmscalpel.scoring import generate, score_targets
from lmscalpel.service.journal import Journal, now, weight_digests
from lmscalpel.service.locking import ReadWriteLock
from lmscalpel.tokens import encode_prompt

log = logging.getLogger(__name__)

PREFERRED_METHODS = ("rome", "ft-l")


@dataclass(frozen=True)
class Limits:
    """Bounds on what one call may ask for (exceeding one is a 422 naming the field; a body over
    ``max_body`` bytes is a 413)."""

    max_body: int = 1_000_000
    max_requests: int = 16
    max_prompts: int = 32
    max_tokens: int = 256
    max_trace_samples: int = 50


class ServiceError(Exception):
    """A failure to report to the client: HTTP ``status``, ``kind`` (the error type), a one-line
    ``message``, the ``field`` at fault (invalid input) and ``extra`` keys for the error body."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        field: str | None = None,
        extra: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.field = field
        self.reason = reason or message
        self.extra = dict(extra or {})


def invalid(field: str, reason: str) -> ServiceError:
    """A 422 naming ``field`` and why."""
    return ServiceError(422, "validation_error", f"{field}: {reason}", field=field, reason=reason)


def _request_field(message: str) -> str:
    """``requests.<i>`` when the library's message starts with ``request <i>``."""
    words = message.split(" ", 2)
    if len(words) >= 2 and words[0] == "request" and words[1].rstrip(":").isdigit():
        return f"requests.{words[1].rstrip(':')}"
    return "requests"


def _answer(result: ProbeResult) -> dict[str, Any]:
    return {
        "answer": result.answer,
        "logprob_new": result.logprob_new,
        "logprob_true": result.logprob_true,
    }


def _probe_views(
    probes: Sequence[tuple[int, Probe]],
    before: Sequence[ProbeResult],
    after: Sequence[ProbeResult] | None,
) -> list[dict[str, Any]]:
    """Each probe with the model's answers before and after (``after`` null when unknown)."""
    return [
        {
            "request": i,
            "role": p.role,
            "prompt": p.prompt,
            "wanted": p.wanted,
            "other": p.other,
            "before": _answer(b),
            "after": None if after is None else _answer(after[n]),
        }
        for n, ((i, p), b) in enumerate(zip(probes, before))
    ]


class EditingService:
    """One loaded model served with its journal (see the module docstring).

    Creating it opens the journal in ``journal_dir`` (refused for another model's journal, see
    :class:`~lmscalpel.service.journal.JournalError`) and replays it onto ``lm``.
    """

    def __init__(
        self, lm: LoadedModel, journal_dir: str | Path, limits: Limits | None = None
    ) -> None:
        self.lm = lm
        self.limits = limits or Limits()
        self.lock = ReadWriteLock()
        self._tracing = threading.Lock()  # one causal trace at a time
        self._shadow: tuple[dict[str, Any], LoadedModel] | None = None
        self.journal = Journal(journal_dir, lm.name, lm.fingerprint)
        try:
            self.applied: dict[str, Patch] = self.journal.replay(lm)
        except BaseException:
            self.journal.close()
            raise

    def close(self) -> None:
        self.journal.close()

    # ---- state -----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """The journal state (call inside the lock)."""
        return {"version": self.journal.version, "applied": list(self.applied)}

    def state(self) -> dict[str, Any]:
        with self.lock.reading():
            return self._state()

    def default_method(self) -> str:
        methods = available_methods()
        return next((m for m in PREFERRED_METHODS if m in methods), methods[0])

    def health(self) -> dict[str, Any]:
        state = self.state()
        return {
            "status": "ok",
            "model": self.lm.name,
            "fingerprint": self.lm.fingerprint,
            "device": str(self.lm.device),
            "version": __version__,
            "methods": available_methods(),
            "default_method": self.default_method(),
            "state": state,
            "applied_edits": state["applied"],
            "journal": str(self.journal.folder),
            "limits": asdict(self.limits),
            "auth": "bearer",
        }

    # ---- journal views ---------------------------------------------------------------------
    def edits(self) -> dict[str, Any]:
        with self.lock.reading():
            views = self.journal.edits()
            state = self._state()
        for view in views:
            view.pop("probes", None)
        return {"edits": views, "state": state}

    def get_edit(self, edit_id: str) -> dict[str, Any]:
        with self.lock.reading():
            for view in self.journal.edits():
                if view["id"] == edit_id:
                    return view
        raise ServiceError(404, "not_found", f"no edit with id {edit_id!r}")

    # ---- edits -----------------------------------------------------------------------------
    def _parse_edit(
        self,
        method: str,
        requests: Sequence[dict[str, Any]],
        config: dict[str, Any] | None,
        guard: dict[str, Any] | None,
    ):
        if not requests:
            raise invalid("requests", "at least one request is needed")
        if len(requests) > self.limits.max_requests:
            raise invalid(
                "requests", f"{len(requests)} requests, at most {self.limits.max_requests} allowed"
            )
        parsed = []
        for i, data in enumerate(requests):
            try:
                parsed.append(EditRequest.from_dict(dict(data)))
            except (EditRequestError, TypeError) as error:
                raise invalid(f"requests.{i}", str(error)) from None
        methods = available_methods()
        if method not in methods:
            close = difflib.get_close_matches(method, methods, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise invalid(
                "method", f"unknown method {method!r}{hint} (known: {', '.join(methods)})"
            )
        try:
            editor = get_editor(method, config or None)
        except ConfigError as error:
            raise invalid("config", str(error)) from None
        try:
            checks = Guard.measure_only() if guard is None else Guard.from_dict(dict(guard))
        except (ConfigError, TypeError) as error:
            raise invalid("guard", str(error)) from None
        return parsed, editor, checks

    def edit(
        self,
        method: str,
        requests: Sequence[dict[str, Any]],
        config: dict[str, Any] | None = None,
        guard: dict[str, Any] | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Compute, apply (guarded), journal and describe one edit; see the API contract."""
        parsed, editor, checks = self._parse_edit(method, requests, config, guard)
        probes = [(i, p) for i, r in enumerate(parsed) for p in r.probes()]
        base = {
            "time": None,
            "method": method,
            "requests": [r.to_dict() for r in parsed],
            "config": config or None,
            "note": note,
        }
        with self.lock.writing():
            started = time.perf_counter()
            base["time"] = now()
            before = probe(self.lm, [p for _, p in probes])
            try:
                patch = edit(self.lm, parsed, editor, guard=checks)
            except GuardRejected as rejected:
                report = rejected.report.to_dict()
                shown = self._rejected_probes(rejected.patch, probes, before)
                entry = self.journal.record_edit(
                    self.journal.new_id(),
                    None,
                    {
                        **base,
                        "status": "rejected",
                        "guard": report,
                        "metrics": report["measured"],
                        "probes": shown,
                        "seconds": round(time.perf_counter() - started, 3),
                    },
                )
                raise ServiceError(
                    400,
                    "guard_rejected",
                    str(rejected),
                    extra={"guard": report, "id": entry["id"], "probes": shown},
                ) from None
            except EditRequestError as error:
                raise invalid(_request_field(str(error)), str(error)) from None
            except ConfigError as error:
                raise invalid("config", str(error)) from None
            except (PatchError, ValueError, RuntimeError) as error:
                raise ServiceError(400, "edit_error", str(error)) from None
            edit_id = None
            try:
                after = probe(self.lm, [p for _, p in probes])
                report = patch.info.get("guard", {})
                edit_id = self.journal.new_id()
                entry = {
                    **base,
                    "status": "applied",
                    "kind": patch.kind,
                    "parameters": patch.parameter_names,
                    "digests": {
                        "model_fingerprint": self.lm.fingerprint,
                        "base": dict(patch.base_digests),
                        "after": weight_digests(self.lm, patch.parameter_names),
                    },
                    "metrics": report.get("measured"),
                    "guard": report if guard is not None else None,
                    "probes": _probe_views(probes, before, after),
                    "seconds": round(time.perf_counter() - started, 3),
                }
                written = self.journal.record_edit(edit_id, patch, entry)
            except BaseException as error:
                patch.revert()
                if edit_id is not None:
                    self.journal.forget_patch(edit_id)
                if isinstance(error, Exception):
                    log.exception("could not journal an edit; it was rolled back")
                    raise ServiceError(
                        500,
                        "journal_error",
                        f"the edit could not be recorded and was rolled back: {error}",
                    ) from None
                raise
            self.applied[edit_id] = patch
            view = dict(written)
            view.pop("op")
            view["state"] = self._state()
        return view

    def _rejected_probes(
        self,
        patch: Patch | None,
        probes: Sequence[tuple[int, Probe]],
        before: Sequence[ProbeResult],
    ) -> list[dict[str, Any]]:
        """The probes' answers under a rejected patch, applied again for the time of measuring
        (inside the write lock: no reader sees it)."""
        if patch is None:
            return _probe_views(probes, before, None)
        patch.apply(self.lm)
        try:
            after = probe(self.lm, [p for _, p in probes])
        finally:
            patch.revert()
        return _probe_views(probes, before, after)

    def revert(self, edit_id: str, cascade: bool = False) -> dict[str, Any]:
        """Revert an applied edit; a later applied edit on the same weights is a 409 unless
        ``cascade``, which reverts those first (newest first)."""
        with self.lock.writing():
            views = {v["id"]: v for v in self.journal.edits()}
            if edit_id not in views:
                raise ServiceError(404, "not_found", f"no edit with id {edit_id!r}")
            if edit_id not in self.applied:
                raise ServiceError(
                    409, "conflict", f"edit {edit_id} is {views[edit_id]['status']}, not applied"
                )
            order = list(self.applied)
            chosen = [edit_id]
            touched = set(self.applied[edit_id].parameter_names)
            for later in order[order.index(edit_id) + 1 :]:
                names = set(self.applied[later].parameter_names)
                if names & touched:
                    chosen.append(later)
                    touched |= names
            conflicts = chosen[1:]
            if conflicts and not cascade:
                raise ServiceError(
                    409,
                    "conflict",
                    f"later edit(s) {', '.join(conflicts)} changed the same weights as {edit_id}; "
                    "revert them first, or ask for cascade=true to revert them too",
                    extra={"conflicts": conflicts},
                )
            undo = list(reversed(chosen))  # newest first
            done: list[str] = []
            try:
                for target in undo:
                    self.applied[target].revert()
                    done.append(target)
                self.journal.record_revert(undo, edit_id)
            except BaseException as error:
                for target in reversed(done):  # put back what was reverted, oldest first
                    self.applied[target].apply(self.lm)
                if isinstance(error, PatchError):
                    raise ServiceError(400, "edit_error", str(error)) from None
                if isinstance(error, Exception):
                    log.exception("could not journal a revert; the edits stay applied")
                    raise ServiceError(
                        500, "journal_error", f"the revert could not be journaled: {error}"
                    ) from None
                raise
            for target in undo:
                del self.applied[target]
            return {
                "id": edit_id,
                "status": "reverted",
                "reverted": undo,
                "state": self._state(),
            }

    # ---- reading the model -----------------------------------------------------------------
    def _check_prompts(self, prompts: Sequence[str], field: str, max_tokens: int = 0) -> None:
        if not prompts:
            raise invalid(field, "at least one prompt is needed")
        if len(prompts) > self.limits.max_prompts:
            raise invalid(
                field, f"{len(prompts)} prompts, at most {self.limits.max_prompts} allowed"
            )
        if max_tokens > self.limits.max_tokens:
            raise invalid("max_tokens", f"{max_tokens} > the limit of {self.limits.max_tokens}")
        context = self.lm.adapter.max_context
        for i, prompt in enumerate(prompts):
            n = len(encode_prompt(self.lm, prompt))
            if n + max_tokens > context:
                raise invalid(
                    f"{field}.{i}",
                    f"{n} prompt tokens + {max_tokens} new ones exceed the model's context of "
                    f"{context} tokens",
                )

    def generate(self, prompts: Sequence[str], max_tokens: int = 20) -> dict[str, Any]:
        self._check_prompts(prompts, "prompts", max_tokens)
        with self.lock.reading():
            texts = generate(self.lm, list(prompts), max_new_tokens=max_tokens)
            state = self._state()
        return {
            "completions": [{"prompt": p, "text": t} for p, t in zip(prompts, texts)],
            "state": state,
        }

    def score(self, items: Sequence[tuple[str, str]]) -> dict[str, Any]:
        self._check_prompts([p for p, _ in items], "items")
        with self.lock.reading():
            try:
                scores = score_targets(self.lm, [p for p, _ in items], [t for _, t in items])
            except ValueError as error:
                raise invalid("items", str(error)) from None
            state = self._state()
        decode = self.lm.tokenizer.decode
        return {
            "scores": [
                {
                    "prompt": p,
                    "target": t,
                    "logprob": s.sum_logprob,
                    "mean_logprob": s.mean_logprob,
                    "prob": s.prob,
                    "tokens": [decode([i]) for i in s.token_ids],
                    "token_logprobs": list(s.token_logprobs),
                    "token_accuracy": s.token_accuracy,
                }
                for (p, t), s in zip(items, scores)
            ],
            "state": state,
        }

    def trace(
        self,
        prompt: str,
        subject: str,
        answer: str | None = None,
        kinds: Sequence[str] = ("hidden", "mlp", "attn"),
        samples: int = 10,
        window: int | None = None,
        noise: float | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """A causal trace (Meng et al. 2022) of ``prompt`` on the model as it is now.

        Tracing hooks the model it runs on, so it runs on a private copy (see
        :meth:`_tracing_model`), one trace at a time: generation and edits go on meanwhile.
        """
        if samples > self.limits.max_trace_samples:
            raise invalid("samples", f"{samples} > the limit of {self.limits.max_trace_samples}")
        self._check_prompts([prompt], "prompt")
        with self._tracing:
            lm, state = self._tracing_model()
            try:
                result = trace(
                    lm,
                    prompt,
                    subject,
                    answer,
                    kinds=list(kinds),
                    samples=samples,
                    window=window,
                    noise=noise,
                    seed=seed,
                )
            except TracingError as error:
                field = "subject" if "subject" in str(error) else "prompt"
                raise invalid(field, str(error)) from None
        data = result.to_dict()
        with tempfile.TemporaryDirectory(prefix="lmscalpel-trace-") as folder:
            both = plot_traces(result, Path(folder) / "trace.png")
            data["png"] = base64.b64encode(both.read_bytes()).decode("ascii")
            data["png_by_kind"] = {
                kind: base64.b64encode(
                    plot_trace(result, kind, Path(folder) / f"{kind}.png").read_bytes()
                ).decode("ascii")
                for kind in result.kinds
            }
        data["state"] = state
        return data

    def _tracing_model(self) -> tuple[LoadedModel, dict[str, Any]]:
        """A copy of the served model in its current state (weights and in-context patches) and
        that state; kept, and reused, until an edit or revert changes the state. Costs one more
        copy of the weights in memory while traces are asked for."""
        with self.lock.reading():
            state = self._state()
            if self._shadow is not None and self._shadow[0] == state:
                return self._shadow[1], state
            self._shadow = None
            model = copy.deepcopy(self.lm.model)
            shadow = LoadedModel(
                model=model,
                tokenizer=self.lm.tokenizer,
                adapter=ModelAdapter(model),
                name=self.lm.name,
                fingerprint=self.lm.fingerprint,
                path=self.lm.path,
                chat=self.lm.chat,
                context_patches=list(self.lm.context_patches),
            )
        self._shadow = (state, shadow)
        return shadow, state

    def complete(
        self, prompts: Sequence[str], max_tokens: int = 16, stop: Sequence[str] = ()
    ) -> dict[str, Any]:
        """Greedy completions in the shape of OpenAI's ``/v1/completions``."""
        self._check_prompts(prompts, "prompt", max_tokens)
        with self.lock.reading():
            texts = generate(self.lm, list(prompts), max_new_tokens=max_tokens)
            state = self._state()
        tok = self.lm.tokenizer
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, (prompt, text) in enumerate(zip(prompts, texts)):
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            finish = "length" if n >= max_tokens else "stop"
            cuts = [text.find(s) for s in stop if s and s in text]
            if cuts:
                text, finish = text[: min(cuts)], "stop"
            prompt_tokens += len(encode_prompt(self.lm, prompt))
            completion_tokens += n
            choices.append(
                {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            )
        return {
            "id": f"cmpl-{time.time_ns():x}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.lm.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "state": state,
        }

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": self.lm.name, "object": "model", "created": 0, "owned_by": "lmscalpel"}
            ],
        }
