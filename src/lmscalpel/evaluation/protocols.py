"""Editing protocols: how edits reach the model while it is measured.

* :func:`run_single` — each case is edited on the pristine model, measured, and reverted; the
  revert is verified (every touched tensor is back to its recorded SHA-256, or the in-context patch
  is gone). The standard protocol of ROME / EasyEdit.
* :func:`run_batch` — ``batch_size`` cases in one editor call (MEMIT-style mass editing), all
  measured with the batch applied, then reverted and verified.
* :func:`run_sequential` — edits accumulate, one case after another; each case is measured right
  after its edit, and at checkpoints (1, 10, 100, 1000 ... and the end) *all* earlier edits are
  measured again, with locality and fluency: the retention curve. The model is returned to its
  pristine weights at the end (and on error); weight patches are applied without backups to save
  memory, since the pristine copies of the touched tensors are kept once.

Each protocol appends one record per finished case to the run's store as soon as it is done, and
skips cases already recorded, so a killed run resumes where it stopped. The sequential protocol
also saves its accumulated edits after every case (see :class:`SequentialState`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmscalpel.core.config import MethodConfig
from lmscalpel.core.requests import EditRequest
from lmscalpel.data.cases import EvalCase
from lmscalpel.evaluation.aggregate import aggregate, case_metrics
from lmscalpel.evaluation.measure import measure, measure_fluency
from lmscalpel.evaluation.options import EvalOptions, EvaluationError
from lmscalpel.evaluation.resources import ResourceMeter, Usage
from lmscalpel.evaluation.store import RunStore, atomic_write_json
from lmscalpel.methods.base import Editor
from lmscalpel.models.fingerprint import model_fingerprint, tensor_digest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch

log = logging.getLogger(__name__)


def compute_and_apply(
    lm: LoadedModel,
    editor: Editor,
    config: MethodConfig,
    requests: Sequence[EditRequest],
    *,
    keep_backup: bool = True,
    before_apply: Callable[[Patch], None] | None = None,
) -> tuple[Patch, Usage]:
    """Run the editor and apply its patch, timing both and sampling peak memory."""
    with ResourceMeter(lm.device) as meter:
        patch = editor.compute(lm, list(requests), config)
        if before_apply is not None:
            before_apply(patch)
        patch.apply(lm, keep_backup=keep_backup)
    return patch, meter.usage


def verify_reverted(lm: LoadedModel, patch: Patch, context_before: int) -> None:
    """Raise unless reverting ``patch`` restored the model exactly."""
    if patch.kind == "context":
        if any(p is patch for p in lm.context_patches) or len(lm.context_patches) != context_before:
            raise EvaluationError(f"{patch.method}: the in-context patch was not removed on revert")
        return
    changed = [
        name
        for name in patch.parameter_names
        if tensor_digest(lm.model.get_parameter(name)) != patch.base_digests.get(name)
    ]
    if changed:
        raise EvaluationError(f"{patch.method}: revert did not restore {changed} bit-exactly")


def _record(
    case: EvalCase,
    post: dict[str, Any],
    pre: dict[str, Any],
    usage: Usage,
    share: float = 1.0,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "key": case.key,
        "case_id": case.case_id,
        "index": case.index,
        "requests": len(case.requests),
        "metrics": case_metrics(post, pre, case.tags),
        "edit_seconds": usage.seconds * share,
        "peak_memory_mb": usage.peak_mb,
        "memory_overhead_mb": usage.overhead_mb,
        **extra,
        "post": post,
    }


def _bar(total: int, done: int, label: str, progress: bool):
    return tqdm(
        total=total, initial=done, desc=label, unit="case", disable=not progress, dynamic_ncols=True
    )


class _PristineCheck:
    """A cheap fingerprint of all weights at the start, compared again at the end."""

    def __init__(self, lm: LoadedModel, what: str) -> None:
        self.lm, self.what = lm, what
        self.context = len(lm.context_patches)
        self.fingerprint = model_fingerprint(lm.model)

    def verify(self) -> None:
        if model_fingerprint(self.lm.model) != self.fingerprint:
            raise EvaluationError(f"{self.what}: the model's weights changed during the run")
        if len(self.lm.context_patches) != self.context:
            raise EvaluationError(f"{self.what}: in-context patches were left applied")


def _run_groups(
    lm: LoadedModel,
    editor: Editor,
    config: MethodConfig,
    label: str,
    groups: Sequence[Sequence[EvalCase]],
    pre: dict[str, dict[str, Any]],
    options: EvalOptions,
    store: RunStore,
    fluency_keys: Collection[str],
    progress: bool,
    desc: str,
) -> None:
    """Edit each group of cases in one editor call on the pristine model, measure the group,
    revert, verify the revert, record each case."""
    sink = store.cases(label)
    done = set(sink.by_key())
    check = _PristineCheck(lm, label)
    total = sum(len(g) for g in groups)
    finished = sum(len(g) for g in groups if all(c.key in done for c in g))
    with _bar(total, finished, desc, progress) as bar:
        for number, group in enumerate(groups):
            if all(c.key in done for c in group):
                continue
            requests = [r for c in group for r in c.requests]
            context_before = len(lm.context_patches)
            patch, usage = compute_and_apply(lm, editor, config, requests)
            try:
                wanted = {c.key for c in group} & set(fluency_keys)
                post = measure(lm, group, options, fluency_keys=wanted)
            finally:
                patch.revert()
            verify_reverted(lm, patch, context_before)
            extra = {"batch": number, "batch_seconds": usage.seconds} if len(groups) < total else {}
            for case in group:
                share = len(case.requests) / len(requests)
                record = _record(case, post[case.key], pre[case.key], usage, share,
                                 revert_verified=True, **extra)  # fmt: skip
                sink.append(record)
                bar.update()
    check.verify()


def run_single(
    lm: LoadedModel,
    editor: Editor,
    config: MethodConfig,
    label: str,
    cases: Sequence[EvalCase],
    pre: dict[str, dict[str, Any]],
    options: EvalOptions,
    store: RunStore,
    *,
    fluency_keys: Collection[str] = (),
    progress: bool = True,
) -> None:
    """Each case edited on the pristine model, measured (one batched scoring call), reverted."""
    groups = [[case] for case in cases]
    _run_groups(lm, editor, config, label, groups, pre, options, store, fluency_keys, progress,
                f"{label} (single)")  # fmt: skip


def run_batch(
    lm: LoadedModel,
    editor: Editor,
    config: MethodConfig,
    label: str,
    cases: Sequence[EvalCase],
    pre: dict[str, dict[str, Any]],
    options: EvalOptions,
    store: RunStore,
    *,
    fluency_keys: Collection[str] = (),
    progress: bool = True,
) -> None:
    """``options.batch_size`` cases per editor call, measured together, then reverted."""
    size = options.batch_size or max(1, len(cases))
    groups = [list(cases[i : i + size]) for i in range(0, len(cases), size)]
    _run_groups(lm, editor, config, label, groups, pre, options, store, fluency_keys, progress,
                f"{label} (batch of {size})")  # fmt: skip


class SequentialState:
    """The accumulated edits of a sequential run: kept resumable, and undone at the end.

    Before a weight patch is applied, the pristine values of the tensors it touches are copied
    once (:meth:`protect`); :meth:`restore` copies them back and reverts in-context patches.
    :meth:`save` writes the current values of every touched tensor (safetensors) and saves each
    in-context patch, then atomically replaces ``state.json``, which names them: a run killed at
    any moment resumes from the last case whose state was committed.
    """

    def __init__(self, lm: LoadedModel, folder: Path) -> None:
        self.lm = lm
        self.folder = Path(folder)
        self.pristine: dict[str, torch.Tensor] = {}
        self.context: list[Patch] = []
        self.context_dirs: list[str] = []
        self.done: list[str] = []
        self.last: dict[str, Any] = {}
        self.generation = 0

    def protect(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.pristine:
                self.pristine[name] = self.lm.model.get_parameter(name).detach().clone()

    def add(self, key: str, patch: Patch, last: dict[str, Any]) -> None:
        if patch.kind == "context":
            self.context.append(patch)
            folder = f"context/{len(self.context_dirs):06d}"
            patch.save(self.folder / folder)
            self.context_dirs.append(folder)
        self.done.append(key)
        self.last = last

    def save(self) -> None:
        self.generation += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = f"weights-{self.generation:06d}.safetensors"
        tensors = {
            name: self.lm.model.get_parameter(name).detach().cpu().contiguous()
            for name in self.pristine
        }
        save_file(tensors, str(self.folder / weights))
        with open(self.folder / weights, "rb") as handle:
            os.fsync(handle.fileno())
        atomic_write_json(
            self.folder / "state.json",
            {
                "fingerprint": self.lm.fingerprint,
                "done": self.done,
                "weights": weights,
                "context": self.context_dirs,
                "last": self.last,
                "generation": self.generation,
            },
        )
        for old in self.folder.glob("weights-*.safetensors"):
            if old.name != weights:
                old.unlink()

    def load(self) -> bool:
        """Re-apply a saved state to the pristine model; False when there is none."""
        pointer = self.folder / "state.json"
        if not pointer.is_file():
            return False
        state = json.loads(pointer.read_text())
        if state["fingerprint"] != self.lm.fingerprint:
            raise EvaluationError(
                f"{self.folder}: the saved sequential state is for model {state['fingerprint']}, "
                f"not {self.lm.fingerprint}"
            )
        tensors = load_file(str(self.folder / state["weights"]))
        self.protect(list(tensors))
        with torch.no_grad():
            for name, value in tensors.items():
                self.lm.model.get_parameter(name).copy_(value)
        for folder in state["context"]:
            patch = Patch.load(self.folder / folder)
            patch.apply(self.lm)
            self.context.append(patch)
        self.context_dirs = list(state["context"])
        self.done = list(state["done"])
        self.last = state.get("last", {})
        self.generation = state.get("generation", 0)
        return True

    def restore(self) -> None:
        """Return the model to its pristine weights and prompts."""
        for patch in reversed(self.context):
            if patch.is_applied:
                patch.revert()
        self.context.clear()
        with torch.no_grad():
            for name, value in self.pristine.items():
                self.lm.model.get_parameter(name).copy_(value)


def _checkpoint(
    lm: LoadedModel,
    cases: Sequence[EvalCase],
    pre: dict[str, dict[str, Any]],
    options: EvalOptions,
    fluency_cases: Sequence[EvalCase],
) -> dict[str, Any]:
    """All ``cases`` (the edits so far) measured again, plus fluency on the fixed fluency set."""
    with ResourceMeter(lm.device) as meter:
        post = measure(lm, cases, options)
        fluency = measure_fluency(lm, fluency_cases, options)
    per_case = [case_metrics(post[c.key], pre[c.key], c.tags) for c in cases]
    per_case += [{"fluency": f["entropy"]} for f in fluency.values()]
    return {
        "edits": len(cases),
        "metrics": aggregate(per_case),
        "seconds": meter.usage.seconds,
        "fluency_texts": {k: f["texts"] for k, f in fluency.items()},
    }


def run_sequential(
    lm: LoadedModel,
    editor: Editor,
    config: MethodConfig,
    label: str,
    cases: Sequence[EvalCase],
    pre: dict[str, dict[str, Any]],
    options: EvalOptions,
    store: RunStore,
    *,
    fluency_keys: Collection[str] = (),
    progress: bool = True,
) -> None:
    """Edits accumulate over ``cases`` in order; a retention curve at the checkpoints."""
    sink, curve = store.cases(label), store.checkpoints(label)
    recorded = set(sink.by_key())
    measured = {r["edits"] for r in curve.read()}
    checkpoints = set(options.checkpoints_for(len(cases)))
    if recorded >= {c.key for c in cases} and measured >= checkpoints:
        return  # finished earlier
    fluency_cases = [c for c in cases if c.key in set(fluency_keys)]
    state = SequentialState(lm, store.state_dir(label))
    check = _PristineCheck(lm, label)
    try:
        state.load()
        done = len(state.done)
        if state.done != [c.key for c in cases[:done]]:
            raise EvaluationError(f"{state.folder}: the saved edits are not this run's first cases")
        with _bar(len(cases), done, f"{label} (sequential)", progress) as bar:
            if done and cases[done - 1].key not in recorded:  # killed after saving the state
                case = cases[done - 1]
                post = measure(lm, [case], options)[case.key]
                sink.append(_record(case, post, pre[case.key], Usage(**state.last), position=done))
            for position in range(done, len(cases) + 1):
                if position in checkpoints and position not in measured:
                    point = _checkpoint(lm, cases[:position], pre, options, fluency_cases)
                    curve.append(point)
                    log.info("%s: %d edits: %s", label, position, _brief(point["metrics"]))
                if position == len(cases):
                    break
                case = cases[position]
                patch, usage = compute_and_apply(
                    lm,
                    editor,
                    config,
                    case.requests,
                    keep_backup=False,
                    before_apply=lambda p: state.protect(p.parameter_names),
                )
                post = measure(lm, [case], options)[case.key]
                state.add(case.key, patch, vars(usage))
                state.save()
                sink.append(_record(case, post, pre[case.key], usage, position=position + 1))
                bar.update()
    finally:
        state.restore()
    check.verify()


def _brief(row: dict[str, float]) -> str:
    keys = ("ES", "PS", "NS", "locality_unchanged", "fluency")
    return ", ".join(f"{k} {row[k]:.3f}" for k in keys if k in row)


PROTOCOL_RUNNERS = {"single": run_single, "batch": run_batch, "sequential": run_sequential}


def clear_state(store: RunStore, label: str) -> None:
    """Remove a finished sequential run's saved edits (they are only needed to resume)."""
    shutil.rmtree(store.state_dir(label), ignore_errors=True)
