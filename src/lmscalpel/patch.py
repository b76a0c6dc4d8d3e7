"""Patches: the only way lmscalpel changes a model.

A :class:`Patch` is what every editing method returns. A weight patch holds one
:class:`ParameterDelta` per touched parameter (dense, or as low-rank factors when the method
produces them, e.g. ROME's rank-one update), the method's name and hyperparameters, the edit
requests, and the SHA-256 digest of every touched tensor *before* the edit. It can be applied,
reverted bit-exactly, saved (safetensors + JSON, never pickle), loaded, and exported as a plain
Hugging Face model. Applying to a model whose touched tensors differ from the recorded digests is
refused, a patch is applied whole or not at all, and a revert checks that every touched tensor has
its recorded digest again. :class:`WeightSnapshot` keeps pristine copies for patches applied
without a backup and restores them with the same check.

An in-context patch (``kind="context"``) changes no weight: it carries the state of a prompt
rewriter (e.g. IKE's demonstrations and facts) that scoring and generation apply to every prompt
while the patch is applied to a :class:`~lmscalpel.models.LoadedModel`. All applied in-context
patches of one method are realised together by one rewriter (see
:meth:`~lmscalpel.models.LoadedModel.rewriters`), so many of them never nest.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmscalpel.core.files import atomic_folder, recover_folder, replaceable
from lmscalpel.core.requests import EditRequest
from lmscalpel.core.version import __version__
from lmscalpel.models.fingerprint import tensor_digest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.rewriters import has_rewriter

FORMAT_VERSION = 1
META_FILE = "patch.json"
TENSOR_FILE = "deltas.safetensors"
EXPORT_FILE = "lmscalpel_patch.json"


class PatchError(RuntimeError):
    """A patch cannot be applied, reverted, saved or loaded as asked."""


class PatchMismatchError(PatchError):
    """The model's weights are not the ones the patch was computed on."""


@dataclass
class ParameterDelta:
    """The change to one parameter, in the parameter's storage layout.

    Either ``dense`` (same shape as the parameter) or low-rank factors ``left`` (rows, r) and
    ``right`` (r, cols) whose product is the change.
    """

    name: str
    shape: tuple[int, ...]
    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(self.shape)
        low_rank = self.left is not None and self.right is not None
        if (self.dense is None) == (not low_rank) or (self.left is None) != (self.right is None):
            raise PatchError(f"delta for {self.name} needs either dense or both low-rank factors")
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
        if self.dense is not None:
            return {f"{self.name}::dense": self.dense.contiguous()}
        return {
            f"{self.name}::left": self.left.contiguous(),
            f"{self.name}::right": self.right.contiguous(),
        }


def _module(target: LoadedModel | nn.Module) -> nn.Module:
    return target.model if isinstance(target, LoadedModel) else target


def check_digests(target: LoadedModel | nn.Module, digests: dict[str, str], what: str) -> None:
    """Raise :class:`PatchError` unless every named parameter has exactly its recorded digest."""
    model = _module(target)
    changed = [n for n, d in digests.items() if tensor_digest(model.get_parameter(n)) != d]
    if changed:
        raise PatchError(f"{what} did not restore {changed} bit-exactly")


def _withdraw(lm: LoadedModel, patch: Patch) -> None:
    """Take the in-context ``patch`` (this very object, not an equal one) off ``lm``, checking that
    it was applied once and is gone."""
    kept = [p for p in lm.context_patches if p is not patch]
    if len(kept) != len(lm.context_patches) - 1:
        raise PatchError(f"the in-context {patch.method} patch is not applied to this model once")
    lm.context_patches[:] = kept


@dataclass
class Patch:
    """An edit as a reversible, saveable, auditable artifact (see the module docstring)."""

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
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    _backup: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _applied_digests: dict[str, str] | None = field(default=None, repr=False, compare=False)
    _applied_to: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("weights", "context"):
            raise PatchError(f"unknown patch kind {self.kind!r}")
        if self.kind == "context" and self.deltas:
            raise PatchError("an in-context patch carries no weight deltas")

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
    ) -> Patch:
        """A weight patch for ``lm`` as it is now (the digests are taken from its weights)."""
        merged: dict[str, ParameterDelta] = {}
        for delta in deltas:
            if delta.name in merged:
                raise PatchError(f"two deltas for parameter {delta.name}")
            merged[delta.name] = delta
        digests = {name: tensor_digest(lm.model.get_parameter(name)) for name in merged}
        return cls(
            method=method,
            requests=list(requests),
            hyperparameters=dict(hyperparameters or {}),
            deltas=list(merged.values()),
            base_digests=digests,
            model_fingerprint=lm.fingerprint,
            model_name=lm.name,
            info=dict(info or {}),
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
            elif tensor_digest(param) != self.base_digests.get(delta.name):
                problems.append(f"{delta.name}: weights differ from the patch's base model")
        if problems:
            raise PatchMismatchError(
                f"patch ({self.method}, made for model {self.model_name!r} "
                f"fingerprint {self.model_fingerprint}) does not fit this model: "
                + "; ".join(problems)
            )

    def apply(self, target: LoadedModel | nn.Module, *, keep_backup: bool = True) -> Patch:
        """Apply the patch in place; all checks happen before any weight changes.

        ``keep_backup=False`` saves memory in long sequential runs but makes :meth:`revert`
        impossible (restore a :func:`weight_snapshot` instead).
        """
        if self.is_applied:
            raise PatchError("patch is already applied; revert it first")
        if self.kind == "context":
            return self._apply_context(target)
        model = _module(target)
        self.check_compatible(model)
        params = {d.name: model.get_parameter(d.name) for d in self.deltas}
        backup = {n: p.detach().clone() for n, p in params.items()} if keep_backup else None
        with torch.no_grad():
            try:
                for delta in self.deltas:
                    param = params[delta.name]
                    param.add_(delta.materialize(param.dtype, param.device))
            except BaseException:
                if backup is not None:
                    for name, saved in backup.items():
                        params[name].copy_(saved)
                raise
        self._backup = backup
        # what revert checks before restoring; without a backup there is no revert to check
        self._applied_digests = (
            {n: tensor_digest(p) for n, p in params.items()} if backup is not None else None
        )
        self._applied_to = model
        return self

    def revert(self, target: LoadedModel | nn.Module | None = None) -> None:
        """Restore the exact weights (or prompts) the patch was applied to, and check it.

        Refused when the weights changed since :meth:`apply` (revert patches in reverse order).
        After restoring, every touched tensor must again have its recorded digest
        (:attr:`base_digests`), and an in-context patch must be gone from the model's applied
        patches; otherwise :class:`PatchError`.
        """
        if not self.is_applied:
            raise PatchError("patch is not applied")
        if self.kind == "context":
            _withdraw(self._applied_to, self)
            self._applied_to = None
            return
        model = self._applied_to if target is None else _module(target)
        if model is not self._applied_to:
            raise PatchError("patch was applied to a different model")
        if self._backup is None:
            raise PatchError("patch was applied without a backup; restore a weight snapshot")
        params = {name: model.get_parameter(name) for name in self._backup}
        changed = [n for n, p in params.items() if tensor_digest(p) != self._applied_digests[n]]
        if changed:
            raise PatchError(
                f"weights of {changed} changed after this patch was applied; revert later "
                "patches first (patches revert in reverse order of application)"
            )
        with torch.no_grad():
            for name, saved in self._backup.items():
                params[name].copy_(saved)
        self._backup = None
        self._applied_digests = None
        self._applied_to = None
        check_digests(model, self.base_digests, f"reverting the {self.method} patch")

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
        target.context_patches.append(self)
        try:
            target.rewriters()  # realise it now, so a bad patch fails here, not when scoring
        except BaseException:
            _withdraw(target, self)
            raise
        self._applied_to = target
        return self

    # ---- persistence -------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:

        return {
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
                }
                for d in self.deltas
            ],
            "context_state": self.context_state,
            "requests": [r.to_dict() for r in self.requests],
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the patch to folder ``path``: ``patch.json`` and, for weights, ``deltas.safetensors``.

        The folder is written next to its final place and swapped into it whole
        (:func:`~lmscalpel.core.files.atomic_folder`): a crash at any moment leaves ``path``
        holding the old patch or the new one, never half of one and never nothing. An existing
        folder is replaced only if it is a saved patch (or empty); another folder is refused, not
        deleted.
        """
        path = Path(path)
        if not replaceable(path, META_FILE):
            raise PatchError(f"{path} exists and is not a saved patch; choose another folder")
        with atomic_folder(path) as tmp:
            (tmp / META_FILE).write_text(json.dumps(self.metadata(), indent=2, ensure_ascii=False))
            if self.deltas:
                tensors = {k: v for d in self.deltas for k, v in d.tensors().items()}
                save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": "lmscalpel-patch"})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Patch:
        """Read a patch saved by :meth:`save` (first finishing a replacement of it that a crash
        interrupted, see :func:`~lmscalpel.core.files.recover_folder`)."""
        path = Path(path)
        recover_folder(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise PatchError(f"{path} is not a saved patch (no {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != "lmscalpel-patch":
            raise PatchError(f"{meta_path} is not an lmscalpel patch")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise PatchError(f"{path} has a newer patch format; upgrade lmscalpel")
        tensors = load_file(str(path / TENSOR_FILE)) if (path / TENSOR_FILE).is_file() else {}
        deltas = []
        for entry in meta["parameters"]:
            name = entry["name"]
            dense = tensors.get(f"{name}::dense")
            left, right = tensors.get(f"{name}::left"), tensors.get(f"{name}::right")
            if dense is None and (left is None or right is None):
                raise PatchError(f"{path}: tensors for {name} are missing")
            deltas.append(ParameterDelta(name, tuple(entry["shape"]), dense, left, right))
        return cls(
            method=meta["method"],
            requests=[EditRequest.from_dict(r) for r in meta["requests"]],
            hyperparameters=meta.get("hyperparameters", {}),
            deltas=deltas,
            base_digests={e["name"]: e["base_sha256"] for e in meta["parameters"]},
            model_fingerprint=meta.get("model_fingerprint"),
            model_name=meta.get("model_name"),
            kind=meta.get("kind", "weights"),
            context_state=meta.get("context_state"),
            info=meta.get("info", {}),
            created=meta.get("created", ""),
        )

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


class WeightSnapshot:
    """Pristine copies of parameters, each taken once, and their verified restoration.

    :meth:`take` copies every named parameter not held yet and records its digest;
    :meth:`restore` copies them all back and checks each against its digest (``PatchError`` when
    one differs). Long sequential evaluations take the tensors each patch touches before applying
    it without a backup (``keep_backup=False``), and restore the pristine model once at the end.
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
        """Copy the named parameters that are not held yet (the first copy is the one kept)."""
        for name in names:
            if name not in self.saved:
                param = self.model.get_parameter(name)
                self.saved[name] = param.detach().clone()
                self.digests[name] = tensor_digest(param)

    def restore(self) -> None:
        """Copy every held parameter back, then check that each has its recorded digest again."""
        with torch.no_grad():
            for name, value in self.saved.items():
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
