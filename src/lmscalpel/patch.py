"""Patches: the only way lmscalpel changes a model.

A :class:`Patch` is what every editing method returns. A weight patch holds one
:class:`ParameterDelta` per touched parameter (dense, or as low-rank factors when the method
produces them, e.g. ROME's rank-one update), the method's name and hyperparameters, the edit
requests, and the SHA-256 digest of every touched tensor *before* the edit. It can be applied,
reverted bit-exactly, saved (safetensors + JSON, never pickle), loaded, and exported as a plain
Hugging Face model.

Guarantees (tested in ``tests/test_patch_atomic.py`` and ``tests/test_patch_tamper.py``):

- **Finite edits only.** A delta holding NaN or infinity is refused where it is made
  (:class:`ParameterDelta`, :meth:`Patch.from_deltas`) and again by :meth:`Patch.apply`, which
  also refuses a delta whose sum with the weights overflows (:class:`NonFiniteDeltaError`).
- **Apply and revert are all or nothing**, under any exception, ``KeyboardInterrupt`` included.
  Everything is computed and checked first (digests, shapes, the new values and their finiteness,
  the digests of the new values); then each touched parameter is switched to its new tensor, which
  is one reference assignment per parameter (no tensor is ever half-written), and the patch's
  state is recorded. An exception at any point before the state is recorded switches every
  parameter back to its original tensor, so the model is bit-identical to before the call, and
  re-raises. Ctrl-C (SIGINT, main thread) arriving while the parameters are switched is held until
  they are switched back, and then raised. A revert that failed (or a revert attempted after a
  failed rollback) can be retried: tensors already back at their recorded base digest count as
  reverted.
- **Verified reverts.** Applying to a model whose touched tensors differ from the recorded
  digests is refused; a revert checks that every backup still has its recorded digest *before*
  touching the model, and refuses when the weights changed since :meth:`Patch.apply`.
- **Tamper-evident files.** ``patch.json`` records the SHA-256 of every delta tensor (with its
  shape, dtype and the parameter it changes, :func:`delta_sha256`), of the requests, the hyperparameters and the in-context state;
  :meth:`Patch.load` refuses anything that does not match, or is malformed, with
  :class:`PatchError`. With a key (argument or ``LMSCALPEL_PATCH_KEY``), :meth:`Patch.save` signs
  the whole record with HMAC-SHA256 and :meth:`Patch.load` refuses unsigned, re-signed or changed
  patches. Digests alone catch damage and careless edits; only a signature proves provenance.
- **Crash-safe saves**: see :meth:`Patch.save`.

:class:`WeightSnapshot` keeps pristine copies for patches applied without a backup and restores
them with the same digest check; its restore is idempotent, so an interrupted one can be retried.

An in-context patch (``kind="context"``) changes no weight: it carries the state of a prompt
rewriter (e.g. IKE's demonstrations and facts) that scoring and generation apply to every prompt
while the patch is applied to a :class:`~lmscalpel.models.LoadedModel`. All applied in-context
patches of one method are realised together by one rewriter (see
:meth:`~lmscalpel.models.LoadedModel.rewriters`), so many of them never nest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save_file
from torch import nn

from lmscalpel.core.clock import utc_now
from lmscalpel.core.files import atomic_folder, recover_folder, replaceable
from lmscalpel.core.requests import EditRequest
from lmscalpel.core.version import __version__
from lmscalpel.models.fingerprint import tensor_digest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.placement import check_resident
from lmscalpel.models.rewriters import has_rewriter

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: SHA-256 of every delta tensor, the requests and hyperparameters; HMAC
META_FILE = "patch.json"
TENSOR_FILE = "deltas.safetensors"
EXPORT_FILE = "lmscalpel_patch.json"
KEY_ENV = "LMSCALPEL_PATCH_KEY"
SIGNATURE_ALGORITHM = "HMAC-SHA256"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_EXTRA_NAME = re.compile(r"[A-Za-z0-9_.-]+")
EXTRA_PREFIX = "extra::"  # file keys of a patch's extra tensors in deltas.safetensors


class PatchError(RuntimeError):
    """A patch cannot be applied, reverted, saved or loaded as asked."""


class PatchMismatchError(PatchError):
    """The model's weights are not the ones the patch was computed on."""


class NonFiniteDeltaError(PatchError):
    """A delta holds NaN or infinity, or would make the weights it is added to non-finite."""


def _fault_point(step: str) -> None:
    """Called between the steps of :meth:`Patch.apply`, :meth:`Patch.revert` and
    :class:`WeightSnapshot`; does nothing. Fault-injection tests replace it to raise at a chosen
    step."""


class _HeldInterrupts:
    """Within the block, Ctrl-C (SIGINT) is recorded instead of raised, so that a step that
    switches weights and records the patch's state, or rolls them back, runs whole.
    :meth:`check` raises the held interrupt (at a point where rolling back is still possible);
    one that arrives after the last check is re-delivered when the block ends without error.
    Only the main thread receives signals, so elsewhere this does nothing."""

    def __init__(self) -> None:
        self.pending = False
        self.previous: Any = None

    def __enter__(self) -> _HeldInterrupts:
        if threading.current_thread() is threading.main_thread():
            try:
                previous = signal.getsignal(signal.SIGINT)
                # None: set outside Python; SIG_IGN: the process ignores Ctrl-C (a background
                # job, nohup), so there is nothing to hold — leave both alone
                if previous is not None and previous is not signal.SIG_IGN:
                    signal.signal(signal.SIGINT, self._hold)
                    self.previous = previous
            except (ValueError, OSError):  # e.g. a sub-interpreter
                self.previous = None
        return self

    def _hold(self, signum, frame) -> None:
        self.pending = True

    def check(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def __exit__(self, kind, value, traceback) -> bool:
        previous, self.previous = self.previous, None
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if self.pending and kind is None:
                self.pending = False
                if callable(previous):
                    previous(signal.SIGINT, None)
                elif previous == signal.SIG_DFL:
                    raise KeyboardInterrupt
        return False


# ---- deltas ----------------------------------------------------------------------------------
def _check_tensor(name: str, role: str, tensor: Any) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise PatchError(f"delta for {name}: {role} is a {type(tensor).__name__}, not a tensor")
    if tensor.dtype not in FLOAT_DTYPES:
        raise PatchError(f"delta for {name}: {role} has dtype {tensor.dtype}, not a float dtype")
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise NonFiniteDeltaError(
            f"delta for {name} is not finite: {role} holds {bad} NaN or infinite value(s) of "
            f"{tensor.numel()}"
        )


@dataclass
class ParameterDelta:
    """The change to one parameter, in the parameter's storage layout.

    Either ``dense`` (same shape as the parameter) or low-rank factors ``left`` (rows, r) and
    ``right`` (r, cols) whose product is the change. Every value must be finite
    (:class:`NonFiniteDeltaError` names the parameter otherwise).
    """

    name: str
    shape: tuple[int, ...]
    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PatchError(f"a delta needs a parameter name, got {self.name!r}")
        self.shape = tuple(self.shape)
        low_rank = self.left is not None and self.right is not None
        if (self.dense is None) == (not low_rank) or (self.left is None) != (self.right is None):
            raise PatchError(f"delta for {self.name} needs either dense or both low-rank factors")
        for role, tensor in self.stored().items():
            _check_tensor(self.name, role, tensor)
        if low_rank and (self.left.dim() != 2 or self.right.dim() != 2):
            raise PatchError(f"delta for {self.name}: low-rank factors must be matrices")
        got = (
            tuple(self.dense.shape)
            if self.dense is not None
            else (self.left.shape[0], self.right.shape[1])
        )
        if low_rank and self.left.shape[1] != self.right.shape[0]:
            raise PatchError(f"delta for {self.name}: factor ranks differ")
        if got != self.shape:
            raise PatchError(f"delta for {self.name} has shape {got}, expected {self.shape}")

    @classmethod
    def from_dense(cls, name: str, delta: torch.Tensor) -> ParameterDelta:
        return cls(name=name, shape=tuple(delta.shape), dense=delta.detach().cpu().clone())

    @classmethod
    def from_low_rank(cls, name: str, left: torch.Tensor, right: torch.Tensor) -> ParameterDelta:
        left, right = left.detach().cpu().clone(), right.detach().cpu().clone()
        return cls(name=name, shape=(left.shape[0], right.shape[1]), left=left, right=right)

    @property
    def rank(self) -> int | None:
        return None if self.left is None else int(self.left.shape[1])

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors by role: ``{"dense": ...}`` or ``{"left": ..., "right": ...}``."""
        if self.dense is not None:
            return {"dense": self.dense}
        return {"left": self.left, "right": self.right}

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteDeltaError` unless every stored value is finite (again: the
        tensors are mutable)."""
        for role, tensor in self.stored().items():
            _check_tensor(self.name, role, tensor)

    def materialize(self, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The full change as a tensor of the parameter's shape."""
        if self.dense is not None:
            full = self.dense
        else:
            full = self.left.double() @ self.right.double()
        return full.to(dtype=dtype or full.dtype, device=device)

    def norm(self) -> float:
        return float(self.materialize(torch.float64).norm())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors under their file keys (``<name>::dense`` or ``::left``/``::right``)."""
        return {f"{self.name}::{role}": t.contiguous() for role, t in self.stored().items()}

    def added_to(self, param: torch.Tensor) -> torch.Tensor:
        """A new tensor: ``param`` plus this change, in ``param``'s dtype and device, checked to
        be finite (:class:`NonFiniteDeltaError` otherwise). ``param`` is not changed."""
        self.check_finite()
        change = self.materialize(param.dtype, param.device)
        if not bool(torch.isfinite(change).all()):
            raise NonFiniteDeltaError(
                f"delta for {self.name} is not finite in {param.dtype} (its factors overflow)"
            )
        new = param.detach().clone()
        new.add_(change)
        if not bool(torch.isfinite(new).all()):
            raise NonFiniteDeltaError(
                f"adding the delta to {self.name} gives NaN or infinite weights ({param.dtype})"
            )
        return new


def _module(target: LoadedModel | nn.Module) -> nn.Module:
    return target.model if isinstance(target, LoadedModel) else target


def check_digests(target: LoadedModel | nn.Module, digests: dict[str, str], what: str) -> None:
    """Raise :class:`PatchError` unless every named parameter has exactly its recorded digest."""
    model = _module(target)
    changed = [n for n, d in digests.items() if tensor_digest(model.get_parameter(n)) != d]
    if changed:
        raise PatchError(f"{what} did not restore {changed} bit-exactly")


def _switch(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Point each parameter at its tensor: one reference assignment each, never a partial copy."""
    for name, tensor in tensors.items():
        _fault_point("switch")
        params[name].data = tensor


def _withdraw(lm: LoadedModel, patch: Patch) -> None:
    """Take the in-context ``patch`` (this very object, not an equal one) off ``lm``, checking that
    it was applied once and is gone."""
    kept = [p for p in lm.context_patches if p is not patch]
    if len(kept) != len(lm.context_patches) - 1:
        raise PatchError(f"the in-context {patch.method} patch is not applied to this model once")
    lm.context_patches[:] = kept


# ---- keys and digests of records -----------------------------------------------------------
def _canonical(value: Any) -> bytes:
    """The one byte form of a JSON value that its digests and signature are computed over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _json_sha256(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def delta_sha256(key: str, tensor: torch.Tensor) -> str:
    """The digest ``patch.json`` records for a stored delta tensor: SHA-256 of its file key
    (``<parameter>::dense|left|right``) and of its shape, dtype and bytes
    (:func:`~lmscalpel.models.fingerprint.tensor_digest`), so that a tensor moved to another
    parameter does not match either."""
    return hashlib.sha256(f"{key}|{tensor_digest(tensor)}".encode()).hexdigest()


def _signing_key(key: bytes | str | None) -> bytes | None:
    """The key to sign or verify with: ``key``, else ``$LMSCALPEL_PATCH_KEY``, else None."""
    if key is None:
        key = os.environ.get(KEY_ENV) or None
        if key is None:
            return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise PatchError(f"a patch key is bytes or str, got {type(key).__name__}")
    if not key:
        raise PatchError("the patch key is empty")
    return bytes(key)


def _hmac(key: bytes, meta: dict[str, Any]) -> str:
    unsigned = {k: v for k, v in meta.items() if k != "signature"}
    return hmac.new(key, _canonical(unsigned), hashlib.sha256).hexdigest()


@dataclass
class Patch:
    """An edit as a reversible, saveable, auditable artifact (see the module docstring for what
    is guaranteed)."""

    method: str
    requests: list[EditRequest]
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    deltas: list[ParameterDelta] = field(default_factory=list)
    base_digests: dict[str, str] = field(default_factory=dict)
    model_fingerprint: str | None = None
    model_name: str | None = None
    kind: str = "weights"
    context_state: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    created: str = field(default_factory=utc_now)
    _backup: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _applied_digests: dict[str, str] | None = field(default=None, repr=False, compare=False)
    _applied_to: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("weights", "context"):
            raise PatchError(f"unknown patch kind {self.kind!r}")
        if self.kind == "context" and self.deltas:
            raise PatchError("an in-context patch carries no weight deltas")
        seen: set[str] = set()
        for delta in self.deltas:
            if not isinstance(delta, ParameterDelta):
                raise PatchError(f"a patch's deltas are ParameterDelta, got {type(delta).__name__}")
            if delta.name in seen:
                raise PatchError(f"two deltas for parameter {delta.name}")
            seen.add(delta.name)
        if not isinstance(self.extras, dict):
            raise PatchError(f"a patch's extras are a dict, got {type(self.extras).__name__}")
        for name, tensor in self.extras.items():
            if not isinstance(name, str) or not _EXTRA_NAME.fullmatch(name):
                raise PatchError(f"extra tensor name {name!r} must match {_EXTRA_NAME.pattern}")
            _check_tensor(f"extra {name}", "the tensor", tensor)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_deltas(
        cls,
        lm: LoadedModel,
        method: str,
        requests: Sequence[EditRequest],
        deltas: Sequence[ParameterDelta],
        hyperparameters: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> Patch:
        """A weight patch for ``lm`` as it is now (the digests are taken from its weights).

        ``extras`` are named tensors the method needs later (e.g. AlphaEdit's keys of earlier
        edits): saved, digested and loaded with the deltas, never applied.

        Refused with :class:`NonFiniteDeltaError` when a delta holds NaN or infinity or would
        make ``lm``'s weights non-finite: no non-finite patch is ever returned.
        """
        merged: dict[str, ParameterDelta] = {}
        for delta in deltas:
            if delta.name in merged:
                raise PatchError(f"two deltas for parameter {delta.name}")
            merged[delta.name] = delta
        check_resident(lm.model, list(merged), f"the {method} patch")
        digests = {}
        for name, delta in merged.items():
            param = lm.model.get_parameter(name)
            if tuple(param.shape) != delta.shape:
                raise PatchError(
                    f"delta for {name} has shape {delta.shape}, the parameter {tuple(param.shape)}"
                )
            delta.added_to(param)  # finite, also in the parameter's dtype and added to it
            digests[name] = tensor_digest(param)
        return cls(
            method=method,
            requests=list(requests),
            hyperparameters=dict(hyperparameters or {}),
            deltas=list(merged.values()),
            base_digests=digests,
            model_fingerprint=lm.fingerprint,
            model_name=lm.name,
            info=dict(info or {}),
            extras={k: v.detach().cpu().contiguous().clone() for k, v in (extras or {}).items()},
        )

    @classmethod
    def in_context(
        cls,
        lm: LoadedModel,
        method: str,
        requests: Sequence[EditRequest],
        context_state: dict[str, Any],
        hyperparameters: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
    ) -> Patch:
        """An in-context patch: no weight changes, ``context_state`` (JSON-serialisable) holds
        everything the method's rewriter needs."""
        return cls(
            method=method,
            requests=list(requests),
            hyperparameters=dict(hyperparameters or {}),
            model_fingerprint=lm.fingerprint,
            model_name=lm.name,
            kind="context",
            context_state=context_state,
            info=dict(info or {}),
        )

    # ---- state -------------------------------------------------------------------------------
    @property
    def is_applied(self) -> bool:
        return self._applied_to is not None

    @property
    def parameter_names(self) -> list[str]:
        return [d.name for d in self.deltas]

    def check_compatible(self, target: LoadedModel | nn.Module) -> None:
        """Raise :class:`PatchMismatchError` unless every touched tensor matches its digest."""
        model = _module(target)
        problems = []
        for delta in self.deltas:
            try:
                param = model.get_parameter(delta.name)
            except AttributeError:
                problems.append(f"{delta.name}: no such parameter")
                continue
            if tuple(param.shape) != delta.shape:
                problems.append(f"{delta.name}: shape {tuple(param.shape)} != {delta.shape}")
            elif param.device.type == "meta":
                problems.append(f"{delta.name}: offloaded by accelerate (keep it resident)")
            elif tensor_digest(param) != self.base_digests.get(delta.name):
                problems.append(f"{delta.name}: weights differ from the patch's base model")
        if problems:
            raise PatchMismatchError(
                f"patch ({self.method}, made for model {self.model_name!r} "
                f"fingerprint {self.model_fingerprint}) does not fit this model: "
                + "; ".join(problems)
            )

    def _parameters(self, model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
        params = {name: model.get_parameter(name) for name in names}
        if len({id(p) for p in params.values()}) != len(params):
            raise PatchError(f"the patch changes one tied parameter under two names: {list(names)}")
        return params

    def apply(self, target: LoadedModel | nn.Module, *, keep_backup: bool = True) -> Patch:
        """Apply the patch in place, all or nothing (see the module docstring).

        First every check: the touched tensors have the recorded digests and shapes, each delta
        is finite in the parameter's dtype and so is its sum with the weights
        (:class:`NonFiniteDeltaError`); the new values are computed beside the old ones, and
        (with a backup) their digests taken. Only then is each parameter switched to its new
        tensor and the state recorded; any exception before that is complete, Ctrl-C included,
        switches every parameter back (bit-identical) and re-raises.

        Memory: the new values of the touched matrices are built beside the originals, so apply
        needs one extra copy of each touched matrix while it runs, whatever ``keep_backup``. With
        ``keep_backup=True`` the originals stay as the backup that :meth:`revert` restores (one
        copy per applied patch); ``keep_backup=False`` drops them when apply returns, which saves
        that memory in long sequential runs but makes :meth:`revert` impossible (restore a
        :class:`WeightSnapshot` instead). Either way the transient originals are what makes an
        interrupted apply roll back.
        """
        if self.is_applied:
            raise PatchError("patch is already applied; revert it first")
        if self.kind == "context":
            return self._apply_context(target)
        model = _module(target)
        self.check_compatible(model)
        params = self._parameters(model, self.parameter_names)
        _fault_point("checked")
        with torch.no_grad():
            new = {}
            for delta in self.deltas:
                new[delta.name] = delta.added_to(params[delta.name])
                _fault_point("computed")
        digests = {n: tensor_digest(t) for n, t in new.items()} if keep_backup else None
        _fault_point("hashed")
        originals = {n: p.data for n, p in params.items()}
        with _HeldInterrupts() as held:
            try:
                _switch(params, new)
                _fault_point("switched")
                held.check()
                self._backup, self._applied_digests, self._applied_to = (
                    originals if keep_backup else None,
                    digests,
                    model,
                )
                _fault_point("recorded")
                held.check()
            except BaseException:
                self._backup = self._applied_digests = self._applied_to = None
                _rollback(params, originals)
                raise
        return self

    def revert(self, target: LoadedModel | nn.Module | None = None) -> None:
        """Restore the exact weights (or prompts) the patch was applied to, all or nothing.

        Refused when the weights changed since :meth:`apply` (revert patches in reverse order),
        and when a backup no longer has the recorded digest of the weights the patch was computed
        on (:attr:`base_digests`): both are checked before anything changes. Then each parameter
        is switched back to its original tensor and the patch marked not applied; an exception
        before that is complete (Ctrl-C included) switches them to the applied tensors again and
        re-raises, and the patch stays applied. Tensors that already have their base digest
        count as reverted, so a revert can always be retried. An in-context patch must be on the
        model's applied patches once, and is taken off.
        """
        if not self.is_applied:
            raise PatchError("patch is not applied")
        if self.kind == "context":
            with _HeldInterrupts():
                _withdraw(self._applied_to, self)
                self._applied_to = None
            return
        model = self._applied_to if target is None else _module(target)
        if model is not self._applied_to:
            raise PatchError("patch was applied to a different model")
        if self._backup is None:
            raise PatchError("patch was applied without a backup; restore a weight snapshot")
        backup, recorded = self._backup, self._applied_digests
        applied = recorded or {}
        params = self._parameters(model, list(backup))
        current = {name: tensor_digest(p) for name, p in params.items()}
        changed = [
            n for n in params if current[n] not in (applied.get(n), self.base_digests.get(n))
        ]
        if changed:
            raise PatchError(
                f"weights of {changed} changed after this patch was applied; revert later "
                "patches first (patches revert in reverse order of application)"
            )
        damaged = [n for n, t in backup.items() if tensor_digest(t) != self.base_digests.get(n)]
        if damaged:
            raise PatchError(
                f"reverting the {self.method} patch cannot restore {damaged} bit-exactly: the "
                "backup no longer has the recorded digest; the patch stays applied"
            )
        _fault_point("checked")
        now = {n: p.data for n, p in params.items()}
        with _HeldInterrupts() as held:
            try:
                _switch(params, backup)
                _fault_point("switched")
                held.check()
                self._backup = self._applied_digests = self._applied_to = None
                _fault_point("recorded")
                held.check()
            except BaseException:
                self._backup, self._applied_digests, self._applied_to = backup, recorded, model
                _rollback(params, now)
                raise

    @contextmanager
    def applied(self, target: LoadedModel | nn.Module) -> Iterator[Patch]:
        """Apply for the duration of a ``with`` block; reverted on exit, also on error."""
        self.apply(target)
        try:
            yield self
        finally:
            self.revert()

    def _apply_context(self, target: LoadedModel | nn.Module) -> Patch:
        if not isinstance(target, LoadedModel):
            raise PatchError("an in-context patch applies to a LoadedModel, not a bare module")
        if not has_rewriter(self.method):
            raise PatchError(f"method {self.method!r} does not make in-context patches")
        with _HeldInterrupts() as held:
            try:
                target.context_patches.append(self)
                target.rewriters()  # realise it now, so a bad patch fails here, not when scoring
                held.check()
                self._applied_to = target
            except BaseException:
                self._applied_to = None
                if any(p is self for p in target.context_patches):
                    _withdraw(target, self)
                raise
        return self

    # ---- persistence -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The ``patch.json`` record (unsigned): everything but the delta tensors, with the
        SHA-256 of each of them and of the requests, hyperparameters and in-context state."""
        for delta in self.deltas:
            delta.check_finite()
        record = {
            "format": "lmscalpel-patch",
            "format_version": FORMAT_VERSION,
            "lmscalpel_version": __version__,
            "kind": self.kind,
            "method": self.method,
            "created": self.created,
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "hyperparameters": self.hyperparameters,
            "parameters": [
                {
                    "name": d.name,
                    "shape": list(d.shape),
                    "rank": d.rank,
                    "norm": d.norm(),
                    "base_sha256": self.base_digests.get(d.name),
                    "dtype": str(next(iter(d.stored().values())).dtype).removeprefix("torch."),
                    "sha256": {
                        role: delta_sha256(f"{d.name}::{role}", t) for role, t in d.stored().items()
                    },
                }
                for d in self.deltas
            ],
            "context_state": self.context_state,
            "requests": [r.to_dict() for r in self.requests],
            "info": self.info,
            "extras": {
                name: {
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "sha256": delta_sha256(f"{EXTRA_PREFIX}{name}", t),
                }
                for name, t in self.extras.items()
            },
        }
        try:  # the digests are over what a reader will parse: JSON's view of the values
            record = json.loads(json.dumps(record, ensure_ascii=False))
        except (TypeError, ValueError) as error:
            raise PatchError(f"the patch's record is not JSON-serialisable: {error}") from None
        record["digests"] = {
            "requests_sha256": _json_sha256(record["requests"]),
            "hyperparameters_sha256": _json_sha256(record["hyperparameters"]),
            "context_state_sha256": _json_sha256(record["context_state"]),
        }
        return record

    def save(self, path: str | os.PathLike, *, key: bytes | str | None = None) -> Path:
        """Write the patch to folder ``path``: ``patch.json`` and, for weights, ``deltas.safetensors``.

        The folder is written next to its final place, flushed to disk, and swapped into it
        whole (:func:`~lmscalpel.core.files.atomic_folder`): a crash at any moment, ``kill -9``
        included, leaves ``path`` holding the old patch or the new one, never half of one and
        never nothing, and the next reader or writer removes a killed writer's leftovers. An
        existing folder is replaced only if it is a saved patch (or empty); another folder is
        refused, not deleted.

        With ``key`` (bytes or str; default ``$LMSCALPEL_PATCH_KEY`` when set) the record, which
        holds the SHA-256 of every delta tensor, is signed with HMAC-SHA256.
        """
        path = Path(path)
        secret = _signing_key(key)
        meta = self.metadata()
        if secret is not None:
            meta["signature"] = {"algorithm": SIGNATURE_ALGORITHM, "value": _hmac(secret, meta)}
        if not replaceable(path, META_FILE):
            raise PatchError(f"{path} exists and is not a saved patch; choose another folder")
        with atomic_folder(path) as tmp:
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
            tensors = {k: v for d in self.deltas for k, v in d.tensors().items()}
            tensors |= {f"{EXTRA_PREFIX}{k}": v.contiguous() for k, v in self.extras.items()}
            if tensors:
                save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "lmscalpel-patch"})
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        key: bytes | str | None = None,
        allow_unverified: bool = False,
    ) -> Patch:
        """Read a patch saved by :meth:`save` (first finishing a replacement of it that a crash
        interrupted, see :func:`~lmscalpel.core.files.recover_folder`), verifying it.

        Refused with :class:`PatchError`: a ``patch.json`` that is not a JSON object of the patch
        format (missing or mistyped fields included); a ``deltas.safetensors`` that is not a
        complete safetensors file (a pickle never is, and lmscalpel never unpickles); a
        parameter listed twice; tensors missing, extra, of another shape or dtype, not finite,
        or whose SHA-256 differs from the recorded one (a changed delta, or one re-targeted to
        another parameter); requests, hyperparameters or in-context state that differ from
        their recorded digests.

        With ``key`` (or ``$LMSCALPEL_PATCH_KEY``), the patch must carry an HMAC-SHA256
        signature made with that key over its whole record, else it is refused. A signed patch
        loaded without a key is still checked against its digests.

        Patches of format 1 (lmscalpel before the digests) carry nothing to verify their deltas
        against; they are refused unless ``allow_unverified=True`` (saving the loaded patch again
        upgrades it).
        """
        path = Path(path)
        recover_folder(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise PatchError(f"{path} is not a saved patch (no {META_FILE})")
        meta = _read_meta(meta_path)
        version = meta.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PatchError(
                f"{meta_path}: format_version must be a positive integer, got {version!r}"
            )
        if version > FORMAT_VERSION:
            raise PatchError(
                f"{path} has patch format {version}, newer than this lmscalpel's "
                f"{FORMAT_VERSION}; upgrade lmscalpel"
            )
        verified = version >= 2
        if not verified and not allow_unverified:
            raise PatchError(
                f"{path} is a format-{version} patch (saved by an older lmscalpel): it records no "
                "digests of its deltas, so it cannot be verified. If you trust it, load it with "
                "Patch.load(path, allow_unverified=True) and save it again to upgrade it."
            )
        _check_signature(meta, meta_path, _signing_key(key))
        reader = _Record(meta, meta_path)
        kind = reader.get("kind", str, "weights")
        if kind not in ("weights", "context"):
            raise PatchError(f"{meta_path}: unknown patch kind {kind!r}")
        entries = reader.get("parameters", list)
        request_data = reader.get("requests", list)
        hyperparameters = reader.get("hyperparameters", dict, {})
        context_state = reader.get("context_state", (dict, type(None)), None)
        if verified:
            digests = reader.get("digests", dict)
            for label, value in (
                ("requests", request_data),
                ("hyperparameters", hyperparameters),
                ("context_state", context_state),
            ):
                if digests.get(f"{label}_sha256") != _json_sha256(value):
                    raise PatchError(
                        f"{meta_path}: the {label} do not match their recorded SHA-256 (the file "
                        "was changed after it was saved)"
                    )
        specs = [_ParameterEntry(e, i, meta_path, verified) for i, e in enumerate(entries)]
        names = [s.name for s in specs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PatchError(f"{meta_path}: parameter(s) {twice} listed more than once")
        tensors = _read_tensors(path / TENSOR_FILE)
        extra_entries = reader.get("extras", dict, {})
        for name, entry in extra_entries.items():
            if not _EXTRA_NAME.fullmatch(name) or not isinstance(entry, dict):
                raise PatchError(f"{meta_path}: malformed extra tensor entry {name!r}")
        expected = {k for s in specs for k in s.file_keys()}
        expected |= {f"{EXTRA_PREFIX}{name}" for name in extra_entries}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise PatchError(
                f"{path}: the delta tensors do not match {META_FILE} (missing {missing}, "
                f"unexpected {extra}); a delta was re-targeted or the files do not belong together"
            )
        deltas = [s.delta(tensors) for s in specs]
        extras = {}
        for name, entry in extra_entries.items():
            tensor = tensors[f"{EXTRA_PREFIX}{name}"]
            if verified and entry.get("sha256") != delta_sha256(f"{EXTRA_PREFIX}{name}", tensor):
                raise PatchError(
                    f"{meta_path}: the extra tensor {name!r} does not match its recorded SHA-256"
                )
            extras[name] = tensor
        requests = []
        for index, data in enumerate(request_data):
            try:
                requests.append(EditRequest.from_dict(data))
            except (ValueError, TypeError) as error:
                raise PatchError(f"{meta_path}: request {index}: {error}") from None
        method = reader.get("method", str)
        try:
            return cls(
                method=method,
                requests=requests,
                hyperparameters=hyperparameters,
                deltas=deltas,
                base_digests={s.name: s.base for s in specs if s.base is not None},
                model_fingerprint=reader.get("model_fingerprint", (str, type(None)), None),
                model_name=reader.get("model_name", (str, type(None)), None),
                kind=kind,
                context_state=context_state,
                info=reader.get("info", dict, {}),
                extras=extras,
                created=reader.get("created", str, ""),
            )
        except PatchError as error:
            raise PatchError(f"{meta_path}: {error}") from None

    def export(self, lm: LoadedModel, folder: str | os.PathLike) -> Path:
        """Write ``lm`` with this patch applied as a plain Hugging Face folder.

        The folder loads with ``transformers`` alone; ``lmscalpel_patch.json`` in it records the
        patch for the audit trail. ``lm`` is left as it was. The folder is written whole or not at
        all (:func:`~lmscalpel.core.files.atomic_folder`); an existing folder is replaced only if
        it is an earlier export (or empty).
        """
        if self.kind == "context":
            raise PatchError(
                "an in-context patch changes prompts, not weights; it cannot be exported as a model"
            )
        folder = Path(folder)
        if not replaceable(folder, EXPORT_FILE):
            raise PatchError(f"{folder} exists and is not an exported model; choose another folder")
        was_applied = self.is_applied
        if not was_applied:
            self.apply(lm)
        try:
            with atomic_folder(folder) as tmp:
                lm.model.save_pretrained(tmp)
                lm.tokenizer.save_pretrained(tmp)
                (tmp / EXPORT_FILE).write_text(
                    json.dumps(self.metadata(), indent=2, ensure_ascii=False)
                )
        finally:
            if not was_applied:
                self.revert()
        return folder

    def __repr__(self) -> str:
        what = ", ".join(self.parameter_names) or self.kind
        return (
            f"Patch(method={self.method!r}, requests={len(self.requests)}, touches=[{what}], "
            f"applied={self.is_applied})"
        )


def _rollback(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Point every parameter back at ``tensors`` (held against Ctrl-C; cannot fail half way)."""
    with _HeldInterrupts():
        for name, tensor in tensors.items():
            params[name].data = tensor


# ---- reading saved patches -------------------------------------------------------------------
def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        text = meta_path.read_bytes().decode("utf-8")
        meta = json.loads(text)
    except OSError as error:
        raise PatchError(f"{meta_path} cannot be read: {error}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise PatchError(f"{meta_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise PatchError(f"{meta_path} holds a JSON {type(meta).__name__}, not a patch record")
    if meta.get("format") != "lmscalpel-patch":
        raise PatchError(f"{meta_path} is not an lmscalpel patch")
    return meta


def _check_signature(meta: dict[str, Any], meta_path: Path, key: bytes | None) -> None:
    signature = meta.get("signature")
    if key is None:
        if signature is not None:
            log.debug("%s is signed; no key given, so only its digests are checked", meta_path)
        return
    if signature is None:
        raise PatchError(
            f"{meta_path} is not signed, and a key was given (argument or ${KEY_ENV}): only "
            "patches signed with that key are accepted"
        )
    if (
        not isinstance(signature, dict)
        or signature.get("algorithm") != SIGNATURE_ALGORITHM
        or not isinstance(signature.get("value"), str)
    ):
        raise PatchError(f"{meta_path}: malformed signature {signature!r}")
    if not hmac.compare_digest(signature["value"], _hmac(key, meta)):
        raise PatchError(
            f"{meta_path}: the signature does not match (wrong key, or the patch was changed "
            "after it was signed)"
        )


class _Record:
    """Typed access to ``patch.json``'s fields; a missing or mistyped one is a PatchError."""

    _MISSING = object()

    def __init__(self, data: dict[str, Any], where: Path | str) -> None:
        self.data, self.where = data, where

    def get(self, key: str, kind, default: Any = _MISSING) -> Any:
        if key not in self.data:
            if default is self._MISSING:
                raise PatchError(f"{self.where}: the field {key!r} is missing")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise PatchError(
                f"{self.where}: the field {key!r} must be {names}, got {type(value).__name__}"
            )
        return value


class _ParameterEntry:
    """One entry of ``patch.json``'s ``parameters``, checked for shape and type."""

    def __init__(self, entry: Any, index: int, meta_path: Path, verified: bool) -> None:
        where = f"{meta_path}: parameters[{index}]"
        if not isinstance(entry, dict):
            raise PatchError(f"{where} must be an object, got {type(entry).__name__}")
        record = _Record(entry, where)
        self.name = record.get("name", str)
        if not self.name:
            raise PatchError(f"{where}: empty parameter name")
        self.where = f"{meta_path}: {self.name}"
        shape = record.get("shape", list)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise PatchError(f"{self.where}: shape must be a list of sizes, got {shape!r}")
        self.shape = tuple(shape)
        rank = record.get("rank", (int, type(None)), None)
        if isinstance(rank, bool) or (rank is not None and rank < 1):
            raise PatchError(f"{self.where}: rank must be a positive integer or null, got {rank!r}")
        self.roles = ("dense",) if rank is None else ("left", "right")
        # None: made without a base model (such a patch is refused by every apply)
        self.base = record.get("base_sha256", (str, type(None)))
        if self.base is not None and not _HEX64.fullmatch(self.base):
            raise PatchError(f"{self.where}: base_sha256 is not a SHA-256 digest")
        self.digests: dict[str, str] | None = None
        if verified:
            digests = record.get("sha256", dict)
            if set(digests) != set(self.roles) or not all(
                isinstance(v, str) and _HEX64.fullmatch(v) for v in digests.values()
            ):
                raise PatchError(f"{self.where}: sha256 must give a digest for {list(self.roles)}")
            self.digests = digests

    def file_keys(self) -> list[str]:
        return [f"{self.name}::{role}" for role in self.roles]

    def delta(self, tensors: dict[str, torch.Tensor]) -> ParameterDelta:
        stored = {role: tensors[f"{self.name}::{role}"] for role in self.roles}
        if self.digests is not None:
            for role, tensor in stored.items():
                if delta_sha256(f"{self.name}::{role}", tensor) != self.digests[role]:
                    raise PatchError(
                        f"{self.where}: the {role} delta tensor ({tuple(tensor.shape)}, "
                        f"{tensor.dtype}) does not match its recorded SHA-256: the deltas were "
                        "changed, damaged, or belong to another parameter"
                    )
        try:
            return ParameterDelta(self.name, self.shape, **stored)
        except PatchError as error:
            raise type(error)(f"{self.where}: {error}") from None


_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _read_tensors(tensor_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file ({} when there is none); anything else, a pickle above
    all, is refused unread. The file is read into memory once, so what is verified is what is
    used (a memory-mapped file changed after the check would change the loaded deltas)."""
    if not os.path.lexists(tensor_path):
        return {}
    if not tensor_path.is_file():
        raise PatchError(f"{tensor_path} is not a file")
    try:
        data = tensor_path.read_bytes()
    except OSError as error:
        raise PatchError(f"{tensor_path} cannot be read: {error}") from None
    if data.startswith(_PICKLE_MAGIC):
        raise PatchError(
            f"{tensor_path} is a pickle (torch.save) file, not safetensors; lmscalpel never "
            "unpickles, since unpickling runs code"
        )
    try:
        return load_tensors(data)
    except Exception as error:  # safetensors raises its own error type, or OSError/ValueError
        raise PatchError(
            f"{tensor_path} is not a complete safetensors file ({type(error).__name__}: {error})"
        ) from None


class WeightSnapshot:
    """Pristine copies of parameters, each taken once, and their verified restoration.

    :meth:`take` copies every named parameter not held yet and records its digest (all the new
    ones or none: an interrupted take records nothing); :meth:`restore` copies them all back and
    checks each against its digest (``PatchError`` when one differs). Restoring is idempotent, so
    an interrupted restore can simply be run again. Long sequential evaluations take the tensors
    each patch touches before applying it without a backup (``keep_backup=False``), and restore
    the pristine model once at the end.
    """

    def __init__(self, target: LoadedModel | nn.Module, names: Sequence[str] = ()) -> None:
        self.model = _module(target)
        self.saved: dict[str, torch.Tensor] = {}
        self.digests: dict[str, str] = {}
        self.take(names)

    @property
    def names(self) -> list[str]:
        return list(self.saved)

    def take(self, names: Sequence[str]) -> None:
        """Copy the named parameters that are not held yet (the first copy is the one kept).
        Parameters that accelerate keeps offloaded are refused (an edit of them would be lost)."""
        check_resident(self.model, names)
        saved, digests = {}, {}
        for name in names:
            if name not in self.saved and name not in saved:
                param = self.model.get_parameter(name)
                saved[name] = param.detach().clone()
                digests[name] = tensor_digest(saved[name])
                _fault_point("snapshot")
        with _HeldInterrupts():
            self.digests.update(digests)
            self.saved.update(saved)

    def restore(self) -> None:
        """Copy every held parameter back, then check that each has its recorded digest again."""
        with _HeldInterrupts(), torch.no_grad():
            for name, value in self.saved.items():
                _fault_point("restore")
                self.model.get_parameter(name).copy_(value)
        check_digests(self.model, self.digests, "restoring a weight snapshot")


@contextmanager
def weight_snapshot(
    target: LoadedModel | nn.Module, names: Sequence[str] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Copy the named parameters (all, by default) and restore them exactly when the block ends.

    Methods that train in place use it so that the model is unchanged whatever happens inside.
    Yields the copies, ``{name: tensor}``. The restoration is verified (see
    :class:`WeightSnapshot`).
    """
    model = _module(target)
    names = list(names) if names is not None else [n for n, _ in model.named_parameters()]
    snapshot = WeightSnapshot(model, names)
    try:
        yield snapshot.saved
    finally:
        snapshot.restore()
