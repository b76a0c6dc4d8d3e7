"""Editing protocols: how edits reach the model while it is measured.

A :class:`MethodRun` holds what every protocol needs (model, editor and config, the cases and their
unedited measurements, the options, the run's store); :func:`run_protocol` runs one.

* :func:`run_batches` — ``size`` cases in one editor call on the pristine model, measured with
  the patch applied, then reverted; :meth:`~lmscalpel.patch.Patch.revert` itself checks that every
  touched tensor is back to its recorded SHA-256, or that the in-context patch is gone.
* :func:`run_single` — batches of one: each case edited, measured and reverted on its own. The
  standard protocol of ROME / EasyEdit.
* :func:`run_batch` — ``options.batch_size`` cases per call (MEMIT-style mass editing).
* :func:`run_sequential` — edits accumulate, ``options.batch_size`` cases (default 1) per editor
  call: lifelong editing. Each case is measured right after its group's edit, and at checkpoints
  (1, 10, 100, 500, 1000, 2000 ... and the end; a checkpoint inside a group is taken at the first
  group boundary at or after it) *all* earlier edits are measured again, with locality and
  fluency: the retention curve. Weight patches are applied without backups to save memory: a
  :class:`~lmscalpel.patch.WeightSnapshot` holds the pristine copy of each touched tensor once and
  restores (and verifies) them at the end, also on error.

Two optional editor attributes, looked up with ``getattr`` (an editor without them is called
plainly):

* ``max_requests_per_call`` (int): a method that edits at most that many requests per call gets
  each group split into calls of that size, applied one after another (later calls see earlier
  edits); the timing covers them all.
* ``compute_in_sequence(lm, requests, config, earlier)``: a sequence-aware method (AlphaEdit keeps
  the keys of earlier edits) is called with it in the sequential protocol instead of ``compute``;
  ``earlier`` is its patches of this run so far, oldest first (their weights are in the model;
  after a resume they are loaded from the run's state and not themselves "applied").

Each protocol appends one record per finished case to the run's store as soon as it is done, and
skips cases already recorded, so a killed run resumes where it stopped. The sequential protocol
also saves its accumulated edits after every group (see :class:`SequentialState`).

A run may be one process's share of the work (``MethodRun.shard``, set by the sharded evaluation
of :mod:`lmscalpel.evaluation.runner`): the single and batch protocols then run the editor calls
whose number is the shard's index modulo its count (:func:`shard_cases`), numbered as in the whole
run, so that their records equal a lone process's. The sequential protocol cannot be split (each
edit is made on top of the ones before) and refuses a shard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmscalpel.core.config import MethodConfig
from lmscalpel.core.files import atomic_write_json, fsync_path
from lmscalpel.core.requests import EditRequest
from lmscalpel.data.cases import EvalCase
from lmscalpel.evaluation.aggregate import aggregate, case_metrics
from lmscalpel.evaluation.measure import measure, measure_fluency
from lmscalpel.evaluation.options import EvalOptions, EvaluationError
from lmscalpel.evaluation.resources import ResourceMeter, Usage
from lmscalpel.evaluation.store import RunStore
from lmscalpel.methods.base import Editor
from lmscalpel.models.fingerprint import model_fingerprint
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import Patch, PatchError, WeightSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodRun:
    """One method's run under a protocol: what every protocol reads.

    ``pre``: the unedited model's measurement of every case, by case key (the reference for
    locality-as-unchanged); ``fluency_keys``: the cases whose fluency is measured.
    """

    lm: LoadedModel
    editor: Editor
    config: MethodConfig
    label: str
    cases: Sequence[EvalCase]
    pre: dict[str, dict[str, Any]]
    options: EvalOptions
    store: RunStore
    fluency_keys: Collection[str] = frozenset()
    progress: bool = True
    shard: tuple[int, int] = (0, 1)
    """(index, count): this process runs the editor calls whose number is ``index`` modulo
    ``count``; ``pre`` needs only their cases. (0, 1): all of them."""

    @property
    def sequence_aware(self) -> bool:
        """Whether the editor takes its earlier patches of a sequence (``compute_in_sequence``)."""
        return callable(getattr(self.editor, "compute_in_sequence", None))

    def edit(
        self,
        requests: Sequence[EditRequest],
        *,
        keep_backup: bool = True,
        before_apply: Callable[[Patch], None] | None = None,
        earlier: Sequence[Patch] | None = None,
    ) -> tuple[list[Patch], Usage]:
        """Run the editor and apply its patch(es), timing both and sampling peak memory.

        One call for all ``requests``, or calls of the editor's ``max_requests_per_call``, each
        applied before the next is computed. With ``earlier`` (the sequential protocol) a
        sequence-aware editor is given its earlier patches. If a later call fails, the patches
        already applied with a backup are reverted (without one, the caller's snapshot restores).
        """
        requests = list(requests)
        limit = getattr(self.editor, "max_requests_per_call", None) or max(1, len(requests))
        patches: list[Patch] = []
        with ResourceMeter(self.lm.device) as meter:
            try:
                for start in range(0, len(requests), limit):
                    chunk = requests[start : start + limit]
                    if earlier is not None and self.sequence_aware:
                        before = [*earlier, *patches]
                        patch = self.editor.compute_in_sequence(self.lm, chunk, self.config,
                                                                before)  # fmt: skip
                    else:
                        patch = self.editor.compute(self.lm, chunk, self.config)
                    if before_apply is not None:
                        before_apply(patch)
                    patch.apply(self.lm, keep_backup=keep_backup)
                    patches.append(patch)
            except BaseException:
                if keep_backup:
                    with _restoring(self.label):
                        for patch in reversed(patches):
                            patch.revert()
                raise
        return patches, meter.usage

    def record(
        self, case: EvalCase, post: dict[str, Any], usage: Usage, share: float = 1.0, **extra: Any
    ) -> dict[str, Any]:
        """The stored record of a finished case (its metrics against the unedited model)."""
        return {
            "key": case.key,
            "case_id": case.case_id,
            "index": case.index,
            "requests": len(case.requests),
            "metrics": case_metrics(post, self.pre[case.key], case.tags),
            "edit_seconds": usage.seconds * share,
            "peak_memory_mb": usage.peak_mb,
            "memory_overhead_mb": usage.overhead_mb,
            **extra,
            "post": post,
        }

    def bar(self, total: int, done: int, what: str):
        return tqdm(total=total, initial=done, desc=f"{self.label} ({what})", unit="case",
                    disable=not self.progress, dynamic_ncols=True)  # fmt: skip


class _PristineCheck:
    """A cheap fingerprint of all weights at the start, compared again at the end: an editor
    that changed the model outside its patch is caught."""

    def __init__(self, lm: LoadedModel, what: str) -> None:
        self.lm, self.what = lm, what
        self.context = len(lm.context_patches)
        self.fingerprint = model_fingerprint(lm.model)

    def verify(self) -> None:
        if model_fingerprint(self.lm.model) != self.fingerprint:
            raise EvaluationError(f"{self.what}: the model's weights changed during the run")
        if len(self.lm.context_patches) != self.context:
            raise EvaluationError(f"{self.what}: in-context patches were left applied")


@contextmanager
def _restoring(label: str) -> Iterator[None]:
    """A restoration the patch mechanics found inexact stops the run as an evaluation error."""
    try:
        yield
    except PatchError as error:
        raise EvaluationError(f"{label}: {error}") from error


def call_size(options: EvalOptions, n_cases: int) -> int:
    """Cases per editor call of the single or batch protocol under ``options``."""
    if options.protocol == "single":
        return 1
    if options.protocol == "batch":
        return options.batch_size or max(1, n_cases)
    raise EvaluationError(f"the {options.protocol} protocol has no independent editor calls")


def editor_calls(cases: Sequence[EvalCase], size: int) -> list[list[EvalCase]]:
    """The cases of each editor call, ``size`` at a time in order (the last call may hold fewer)."""
    return [list(cases[i : i + size]) for i in range(0, len(cases), size)]


def shard_cases(
    cases: Sequence[EvalCase], options: EvalOptions, shard: tuple[int, int]
) -> list[EvalCase]:
    """The cases shard ``(index, count)`` of a single or batch run edits: those of the editor
    calls whose number is ``index`` modulo ``count`` (whole calls, so a batch stays together)."""
    index, count = shard
    calls = editor_calls(cases, call_size(options, len(cases)))
    return [case for number, call in enumerate(calls) if number % count == index for case in call]


def run_batches(run: MethodRun, size: int, what: str | None = None) -> None:
    """Edit ``size`` cases at a time in one editor call on the pristine model, measure them with
    the patch applied, revert it (the patch verifies its own restoration), record each case.
    Only the calls of ``run.shard`` are made, numbered as in the whole run."""
    cases = run.cases
    groups = editor_calls(cases, size)
    index, count = run.shard
    mine = [number for number in range(len(groups)) if number % count == index]
    sink = run.store.cases(run.label)
    done = set(sink.by_key())
    check = _PristineCheck(run.lm, run.label)
    finished = sum(len(groups[n]) for n in mine if all(c.key in done for c in groups[n]))
    total = sum(len(groups[n]) for n in mine)
    with run.bar(total, finished, what or f"batch of {size}") as bar:
        for number in mine:
            group = groups[number]
            if all(c.key in done for c in group):
                continue
            requests = [r for c in group for r in c.requests]
            patches, usage = run.edit(requests)
            try:
                wanted = {c.key for c in group} & set(run.fluency_keys)
                post = measure(run.lm, group, run.options, fluency_keys=wanted)
            finally:
                with _restoring(run.label):
                    for patch in reversed(patches):
                        patch.revert()
            batched = len(groups) < len(cases)
            extra = {"batch": number, "batch_seconds": usage.seconds} if batched else {}
            for case in group:
                share = len(case.requests) / len(requests)
                sink.append(run.record(case, post[case.key], usage, share, revert_verified=True,
                                       **extra))  # fmt: skip
                bar.update()
    check.verify()


def run_single(run: MethodRun) -> None:
    """Each case edited on the pristine model, measured (one batched scoring call), reverted:
    batches of one."""
    run_batches(run, 1, "single")


def run_batch(run: MethodRun) -> None:
    """``options.batch_size`` cases per editor call (all cases when ``None``), measured together,
    then reverted."""
    run_batches(run, run.options.batch_size or max(1, len(run.cases)))


SEQUENTIAL_UNSHARDABLE = (
    "the sequential protocol cannot be split over several processes (each edit is made on top "
    "of all the ones before): run it in one process, without torchrun"
)


class SequentialState:
    """The accumulated edits of a sequential run: kept resumable, and undone at the end.

    Before a weight patch is applied (without a backup), the pristine values of the tensors it
    touches are taken into a :class:`~lmscalpel.patch.WeightSnapshot` (:meth:`protect`);
    :meth:`restore` reverts the in-context patches and restores the snapshot, each verifying
    itself. :meth:`save` writes the current values of every touched tensor (safetensors) and saves
    each in-context patch (and, for a sequence-aware editor, each weight patch: what it carries to
    the next call), then atomically replaces ``state.json``, which names them: a run killed at any
    moment resumes from the last group whose state was committed.
    """

    def __init__(self, lm: LoadedModel, folder: Path, keep_patches: bool = False) -> None:
        self.lm = lm
        self.folder = Path(folder)
        self.keep_patches = keep_patches
        self.pristine = WeightSnapshot(lm)
        self.context: list[Patch] = []
        self.context_dirs: list[str] = []
        self.sequence: list[Patch] = []  # a sequence-aware editor's patches, oldest first
        self.sequence_dirs: list[str] = []
        self.done: list[str] = []
        self.last: dict[str, Any] = {}
        self.generation = 0

    def protect(self, names: Sequence[str]) -> None:
        self.pristine.take(names)

    def add(
        self, keys: str | Sequence[str], patches: Patch | Sequence[Patch], last: dict[str, Any]
    ) -> None:
        """Record the cases ``keys``, edited by ``patches`` (applied), and the edit's usage."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        patches = [patches] if isinstance(patches, Patch) else list(patches)
        for patch in patches:
            if patch.kind == "context":
                self.context.append(patch)
                folder = f"context/{len(self.context_dirs):06d}"
                patch.save(self.folder / folder)
                self.context_dirs.append(folder)
            elif self.keep_patches:
                self.sequence.append(patch)
                folder = f"sequence/{len(self.sequence_dirs):06d}"
                patch.save(self.folder / folder)
                self.sequence_dirs.append(folder)
        self.done.extend(keys)
        self.last = last

    def save(self) -> None:
        self.generation += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = f"weights-{self.generation:06d}.safetensors"
        tensors = {
            name: self.lm.model.get_parameter(name).detach().cpu().contiguous()
            for name in self.pristine.names
        }
        save_file(tensors, str(self.folder / weights))
        fsync_path(self.folder / weights)
        atomic_write_json(
            self.folder / "state.json",
            {
                "fingerprint": self.lm.fingerprint,
                "done": self.done,
                "weights": weights,
                "context": self.context_dirs,
                "sequence": self.sequence_dirs,
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
        self.sequence_dirs = list(state.get("sequence", []))
        if self.keep_patches:  # loaded, not applied: their weights came in with the tensors
            self.sequence = [Patch.load(self.folder / f) for f in self.sequence_dirs]
        self.done = list(state["done"])
        self.last = state.get("last", {})
        self.generation = state.get("generation", 0)
        return True

    def restore(self) -> None:
        """Return the model to its pristine weights and prompts (verified: ``PatchError`` when
        either is not exactly back)."""
        for patch in reversed(self.context):
            if patch.is_applied:
                patch.revert()
        self.context.clear()
        self.pristine.restore()


def _checkpoint(
    run: MethodRun, cases: Sequence[EvalCase], fluency_cases: Sequence[EvalCase]
) -> dict[str, Any]:
    """All ``cases`` (the edits so far) measured again, plus fluency on the fixed fluency set."""
    with ResourceMeter(run.lm.device) as meter:
        post = measure(run.lm, cases, run.options)
        fluency = measure_fluency(run.lm, fluency_cases, run.options)
    per_case = [case_metrics(post[c.key], run.pre[c.key], c.tags) for c in cases]
    per_case += [{"fluency": f["entropy"]} for f in fluency.values()]
    return {
        "edits": len(cases),
        "metrics": aggregate(per_case),
        "seconds": meter.usage.seconds,
        "fluency_texts": {k: f["texts"] for k, f in fluency.items()},
    }


def run_sequential(run: MethodRun) -> None:
    """Edits accumulate over the cases in order, ``options.batch_size`` cases (default 1) per
    editor call; a retention curve at the checkpoints (see the module docstring)."""
    lm, cases, options, label = run.lm, run.cases, run.options, run.label
    if run.shard[1] > 1:
        raise EvaluationError(SEQUENTIAL_UNSHARDABLE)
    size = options.batch_size or 1
    sink, curve = run.store.cases(label), run.store.checkpoints(label)
    recorded = set(sink.by_key())
    measured = {r["edits"] for r in curve.read()}
    checkpoints = set(options.checkpoints_for(len(cases), size))
    if recorded >= {c.key for c in cases} and measured >= checkpoints:
        return  # finished earlier
    fluency_cases = [c for c in cases if c.key in run.fluency_keys]
    state = SequentialState(lm, run.store.state_dir(label), keep_patches=run.sequence_aware)
    check = _PristineCheck(lm, label)
    positions = {c.key: i + 1 for i, c in enumerate(cases)}

    def record(group: Sequence[EvalCase], post: dict[str, Any], usage: Usage, number: int,
               only: Collection[str] | None = None) -> None:  # fmt: skip
        """Record the cases of group ``number`` (those in ``only``), sharing its edit time."""
        edits = sum(len(c.requests) for c in group)
        extra = {"batch": number, "batch_seconds": usage.seconds} if size > 1 else {}
        for case in group:
            if only is not None and case.key not in only:
                continue
            share = len(case.requests) / edits
            sink.append(run.record(case, post[case.key], usage, share,
                                   position=positions[case.key], **extra))  # fmt: skip

    try:
        state.load()
        done = len(state.done)
        if state.done != [c.key for c in cases[:done]] or (done % size and done != len(cases)):
            raise EvaluationError(
                f"{state.folder}: the saved edits are not this run's first cases in groups of "
                f"{size}"
            )
        what = "sequential" if size == 1 else f"sequential, {size} per call"
        with run.bar(len(cases), done, what) as bar:
            if done:  # killed after saving the state, before recording the group's cases
                number = (done - 1) // size
                group = cases[number * size : done]
                missing = [c for c in group if c.key not in recorded]
                if missing:
                    post = measure(lm, missing, options)
                    record(group, post, Usage(**state.last), number, {c.key for c in missing})
            for position in [*range(done, len(cases), size), len(cases)]:
                if position in checkpoints and position not in measured:
                    point = _checkpoint(run, cases[:position], fluency_cases)
                    curve.append(point)
                    log.info("%s: %d edits: %s", label, position, _brief(point["metrics"]))
                if position == len(cases):
                    break
                number = position // size
                group = list(cases[position : position + size])
                patches, usage = run.edit(
                    [r for c in group for r in c.requests],
                    keep_backup=False,
                    before_apply=lambda p: state.protect(p.parameter_names),
                    earlier=state.sequence,
                )
                post = measure(lm, group, options)
                state.add([c.key for c in group], patches, vars(usage))
                state.save()
                record(group, post, usage, number)
                bar.update(len(group))
    finally:
        with _restoring(label):
            state.restore()
    check.verify()


def _brief(row: dict[str, float]) -> str:
    keys = ("ES", "PS", "NS", "locality_unchanged", "fluency")
    return ", ".join(f"{k} {row[k]:.3f}" for k in keys if k in row)


PROTOCOL_RUNNERS: dict[str, Callable[[MethodRun], None]] = {
    "single": run_single,
    "batch": run_batch,
    "sequential": run_sequential,
}


def run_protocol(run: MethodRun) -> None:
    """Run ``run.options.protocol`` (see the module docstring)."""
    PROTOCOL_RUNNERS[run.options.protocol](run)
