"""Running an evaluation: the unedited baseline, each method under a protocol, the summary.

:func:`compare` is the whole pipeline, :func:`evaluate` its one-method form::

    cases = load_cases("../shared/data/counterfact/edit.json", n=50)
    summary = evaluate(lm, cases, "ft-l", out="runs/ft-l")
    summary.rows["unedited"]["ES"], summary.rows["ft-l"]["ES"]

1. Cases are validated against the model; a case that cannot be edited on it (a prompt longer than
   the context, a subject that maps to no token) is reported and left out of every row.
2. The unedited model measures every case once (batched across cases); this is the baseline row,
   and the reference for locality-as-unchanged-output.
3. Each method does its one-time work first (``Editor.prepare``: statistics, prefixes; cached,
   and not counted in the edit times), then runs under the protocol; results are appended case by case to ``out`` (see
   :mod:`lmscalpel.evaluation.store`), so a killed run started again with the same ``out`` resumes.
4. The summary (one row per method, the baseline first), a markdown table and PNG plots are
   written atomically.

Under a launch of several processes (``torchrun``; :mod:`lmscalpel.runtime.distributed`) the
single and batch protocols are sharded: every rank takes every ``world``-th editor call (a batch
stays whole), measures the baseline of those cases and runs them; rank 0 gathers the records and
writes the one run folder, as a lone process would have written it (the same files, the same
order of records); the other ranks keep their records in a temporary folder of their own until
rank 0 has them. Records reach the run folder after each stage (the baseline, each method) and
when a stage fails, so a killed distributed run resumes — with any number of processes — from the
last stage that ended; the work of the interrupted stage is done again. The sequential protocol
cannot be sharded (each edit builds on the ones before) and is refused under several processes.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmscalpel.core.config import MethodConfig
from lmscalpel.core.files import atomic_write_json, atomic_write_text
from lmscalpel.core.requests import EditRequestError
from lmscalpel.data.cases import EvalCase
from lmscalpel.editing import validate_requests
from lmscalpel.evaluation.aggregate import BASELINE, aggregate, case_metrics, resource_columns
from lmscalpel.evaluation.measure import measure, probes_of
from lmscalpel.evaluation.options import EvalOptions, EvaluationError, comparable_settings
from lmscalpel.evaluation.plots import plot_metrics, plot_retention
from lmscalpel.evaluation.protocols import (
    SEQUENTIAL_UNSHARDABLE,
    MethodRun,
    run_protocol,
    shard_cases,
)
from lmscalpel.evaluation.store import RunStore
from lmscalpel.evaluation.summary import Summary
from lmscalpel.methods import get_editor
from lmscalpel.methods.base import Editor
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime import distributed

log = logging.getLogger(__name__)

ConfigLike = MethodConfig | dict[str, Any] | str | Path | None


@dataclass(frozen=True)
class MethodSpec:
    """A method to evaluate: its registered name, its configuration (a config object, a dict of
    overrides, a YAML path, or ``None`` for the family defaults) and the label of its row
    (default: the name; give labels to compare one method under several configurations)."""

    method: str
    config: ConfigLike = None
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.method


def _specs(methods: Sequence[str | MethodSpec] | Mapping[str, ConfigLike]) -> list[MethodSpec]:
    if isinstance(methods, Mapping):
        specs = [MethodSpec(m, c) for m, c in methods.items()]
    else:
        specs = [m if isinstance(m, MethodSpec) else MethodSpec(m) for m in methods]
    if not specs:
        raise EvaluationError("no method to evaluate")
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates or BASELINE in names:
        raise EvaluationError(
            f"method labels must be unique and not {BASELINE!r}: {duplicates or [BASELINE]}"
        )
    return specs


def usable_cases(
    lm: LoadedModel, cases: Sequence[EvalCase]
) -> tuple[list[EvalCase], list[dict[str, Any]]]:
    """The cases every method can edit on ``lm``, and the others with the reason."""
    keys = [c.key for c in cases]
    if len(set(keys)) != len(keys):
        raise EvaluationError("cases must have unique keys (load each data file once)")
    good, bad = [], []
    for case in cases:
        try:
            validate_requests(lm, case.requests)
        except EditRequestError as error:
            bad.append({"key": case.key, "index": case.index, "reason": str(error)})
            continue
        good.append(case)
    if bad:
        log.warning(
            "%d case(s) cannot be edited on this model and are left out: %s",
            len(bad),
            "; ".join(f"case {b['index']}: {b['reason']}" for b in bad[:3]),
        )
    return good, bad


def _normalised(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _depends_on(editor: Any, config: MethodConfig) -> dict[str, Any]:
    extra = editor.depends_on(config)
    return {"depends_on": extra} if extra else {}


def _check_manifest(store: RunStore, manifest: dict[str, Any], overwrite: bool) -> None:
    old = store.manifest()
    if old is None or overwrite:
        return
    what = {
        "cases": "cases",
        "model_fingerprint": "model",
        "chat": "chat setting",
        "measurement": "evaluation settings (protocol, batch size, checkpoints, fluency, "
        "exact match)",
    }
    for key, name in what.items():
        before, now = _normalised(old.get(key)), _normalised(manifest.get(key))
        if key == "measurement":
            before, now = comparable_settings(before or {}), comparable_settings(now)
        if before != now:
            raise EvaluationError(
                f"{store.root} holds another run (other {name}); use another --out, or "
                "--overwrite to start it again"
            )
    for label, spec in manifest["methods"].items():
        before = old.get("methods", {}).get(label)
        if before is not None and _normalised(before) != _normalised(spec):
            raise EvaluationError(
                f"{store.root}: method {label!r} ran there with another configuration or "
                "protocol; use another --out or label, or --overwrite"
            )
    manifest["methods"] = {**old.get("methods", {}), **manifest["methods"]}


BASELINE_SETTINGS = ("exact_match", "fluency_prompts", "fluency_tokens")


def _same_prompts(case: EvalCase, pre: dict[str, Any]) -> bool:
    """Whether a stored measurement ``pre`` is of ``case`` (the same prompts, role by role)."""
    probes = probes_of(case)
    return all(
        [p.prompt for p in probes if p.role == role] == [e["prompt"] for e in pre.get(role, [])]
        for role in ("edit", "paraphrase", "locality", "portability")
    )


def reusable_baseline(
    folders: Sequence[str | Path],
    manifest: dict[str, Any],
    cases: Sequence[EvalCase],
    fluency_keys: set[str],
) -> dict[str, dict[str, Any]]:
    """Unedited measurements of ``cases`` that other run folders already hold, by case key.

    A folder without a run is skipped; one of another model, chat setting or measurement
    (exact match, fluency prompts and tokens) is refused. A record is taken when it measured the
    same prompts and has fluency exactly when this run wants it for the case.
    """
    found: dict[str, dict[str, Any]] = {}
    wanted = {c.key: c for c in cases}
    for folder in folders:
        other = RunStore(folder)
        if other.root.resolve() == Path(manifest.get("out", "")).resolve():
            continue
        old = other.manifest() if other.root.is_dir() else None
        if old is None:
            continue
        mine, theirs = manifest["measurement"], old.get("measurement", {})
        if (
            old.get("model_fingerprint") != manifest["model_fingerprint"]
            or old.get("chat") != manifest["chat"]
            or any(theirs.get(k) != mine.get(k) for k in BASELINE_SETTINGS)
        ):
            raise EvaluationError(
                f"{folder}: its unedited measurements are of another model or measurement "
                f"settings ({', '.join(BASELINE_SETTINGS)}); cannot reuse them"
            )
        for key, record in other.baseline.by_key().items():
            case = wanted.get(key)
            if case is None or key in found:
                continue
            pre = record["pre"]
            if ("fluency" in pre) == (key in fluency_keys) and _same_prompts(case, pre):
                found[key] = pre
    return found


def _baseline(
    lm: LoadedModel,
    cases: Sequence[EvalCase],
    options: EvalOptions,
    store: RunStore,
    fluency_keys: set[str],
    progress: bool,
    known: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Measurements of the unedited model, batched across cases, stored as they are made;
    ``known`` ones (see :func:`reusable_baseline`) are stored without measuring."""
    sink = store.baseline
    stored = {k: r["pre"] for k, r in sink.by_key().items()}
    for case in cases:
        if case.key not in stored and known and case.key in known:
            sink.append({"key": case.key, "pre": known[case.key]})
            stored[case.key] = known[case.key]
    todo = [c for c in cases if c.key not in stored]
    chunk = max(options.score_batch_size, 16)
    with tqdm(
        total=len(cases),
        initial=len(cases) - len(todo),
        desc="unedited",
        unit="case",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            found = measure(lm, part, options, fluency_keys=fluency_keys)
            for case in part:
                sink.append({"key": case.key, "pre": found[case.key]})
                stored[case.key] = found[case.key]
            bar.update(len(part))
    return stored


def _method_row(store: RunStore, label: str, cases: Sequence[EvalCase], protocol: str):
    records = store.cases(label).by_key()
    mine = [records[c.key] for c in cases if c.key in records]
    if len(mine) != len(cases):
        raise EvaluationError(f"{label}: {len(cases) - len(mine)} case(s) have no result")
    curve = sorted(store.checkpoints(label).read(), key=lambda r: r["edits"])
    if protocol == "sequential":
        final = [p for p in curve if p["edits"] == len(cases)]
        row = dict(final[-1]["metrics"]) if final else {}
        retention = [{"edits": p["edits"], **p["metrics"]} for p in curve]
    else:
        row = aggregate(r["metrics"] for r in mine)
        retention = []
    row.update(resource_columns(mine))
    row["n_cases"] = len(mine)
    row["n_edits"] = sum(r["requests"] for r in mine)
    return row, retention


def compare(
    lm: LoadedModel,
    cases: Sequence[EvalCase],
    methods: Sequence[str | MethodSpec] | Mapping[str, ConfigLike],
    *,
    protocol: str | None = None,
    options: EvalOptions | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    baseline_from: Sequence[str | Path] = (),
) -> Summary:
    """Evaluate several methods on the same cases in one run; returns the :class:`Summary`.

    ``methods``: names, :class:`MethodSpec` s, or ``{name: config}``. ``protocol`` overrides
    ``options.protocol``. With ``out`` every result is kept there (and a killed run resumes from
    it); without, a temporary folder is used. ``info`` is stored in the summary (e.g. the data
    file's name and its malformed records). ``baseline_from``: other run folders whose unedited
    measurements of these cases are reused (see :func:`reusable_baseline`; runs of one model
    under several protocols then measure the unedited model once).
    """
    started = time.perf_counter()
    options = options or EvalOptions()
    if protocol is not None and protocol != options.protocol:
        options = EvalOptions.from_dict({**options.to_dict(), "protocol": protocol})
    specs = _specs(methods)
    editors = {s.name: get_editor(s.method, s.config) for s in specs}
    configs = {name: editor.config_for(lm) for name, editor in editors.items()}
    cases, left_out = usable_cases(lm, cases)
    if not cases:
        raise EvaluationError("no case to evaluate")
    distributed.join(lm.device)
    sharded = distributed.lockstep()
    if sharded and options.protocol == "sequential":
        raise EvaluationError(SEQUENTIAL_UNSHARDABLE)
    manifest = {
        "format": "lmscalpel-evaluation",
        "cases": [c.key for c in cases],
        "model": lm.name,
        "model_fingerprint": lm.fingerprint,
        "chat": lm.chat,
        "measurement": options.measurement_settings(),
        "methods": {
            s.name: {
                "method": s.method,
                "protocol": options.protocol,
                "config": configs[s.name].to_dict(),
                **_depends_on(editors[s.name], configs[s.name]),
            }
            for s in specs
        },
    }
    fluency_keys = {c.key for c in cases[: options.fluency_cases]}
    with tempfile.TemporaryDirectory(prefix="lmscalpel-eval-") as scratch:
        root = Path(out) if out is not None else Path(scratch) / "run"
        if sharded:
            run = _ShardedRun(lm, cases, options, root, Path(scratch), fluency_keys, progress)
            rows, retention, prepared = run.all(
                editors, configs, manifest, overwrite, baseline_from
            )
            store = run.store  # (None but on rank 0, the only one that writes the summary)
        else:
            store = RunStore(root)
            _prepare_folder(store, overwrite)
            _check_manifest(store, manifest, overwrite)
            store.write_manifest(manifest)
            known = reusable_baseline(
                baseline_from, {**manifest, "out": str(store.root)}, cases, fluency_keys
            )
            pre = _baseline(lm, cases, options, store, fluency_keys, progress, known)
            rows = {BASELINE: _baseline_row(cases, pre)}
            retention = {}
            prepared = {}
            for spec in specs:
                label = spec.name
                clock = time.perf_counter()  # one-time work (statistics ...), outside edit times
                editors[label].prepare(lm, configs[label])
                prepared[label] = time.perf_counter() - clock
                run = MethodRun(lm, editors[label], configs[label], label, cases, pre, options,
                                store, frozenset(fluency_keys), progress)  # fmt: skip
                run_protocol(run)
                rows[label], curve = _method_row(store, label, cases, options.protocol)
                if options.protocol == "sequential":
                    retention[label] = curve
                    store.clear_state(label)  # the saved edits only serve a resume

        def finish() -> Summary:
            summary = Summary(
                rows=rows,
                protocol=options.protocol,
                n_cases=len(cases),
                batch_size=min(options.group_size or len(cases), len(cases)),
                retention=retention,
                info={
                    **(info or {}),
                    "model": lm.name,
                    "model_fingerprint": lm.fingerprint,
                    "options": options.to_dict(),
                    "methods": manifest["methods"],
                    "left_out_cases": left_out,
                    "prepare_seconds": prepared,
                    "out": str(out) if out is not None else None,
                    "wall_seconds": time.perf_counter() - started,
                    **({"processes": distributed.world_size()} if sharded else {}),
                },
            )
            if out is not None:
                write_outputs(summary, store)
            return summary

        # sharded: rank 0 writes the summary, and every rank returns it
        return distributed.on_rank_zero(finish) if sharded else finish()


def _baseline_row(cases: Sequence[EvalCase], pre: dict[str, dict[str, Any]]) -> dict[str, Any]:
    row = aggregate(case_metrics(pre[c.key], None, c.tags) for c in cases)
    row["n_cases"] = len(cases)
    return row


class _ShardedRun:
    """One rank's part of a sharded evaluation (see the module docstring): its cases
    (:func:`~lmscalpel.evaluation.protocols.shard_cases`), its records kept in a scratch folder
    of its own until gathered; on rank 0 also the run folder at ``root`` (``store``), which only
    rank 0 opens."""

    def __init__(
        self,
        lm: LoadedModel,
        cases: Sequence[EvalCase],
        options: EvalOptions,
        root: Path,
        scratch: Path,
        fluency_keys: set[str],
        progress: bool,
    ) -> None:
        self.lm, self.cases, self.options = lm, list(cases), options
        self.fluency_keys = fluency_keys
        self.shard = (distributed.rank(), distributed.world_size())
        self.mine = shard_cases(cases, options, self.shard)
        self.lead = self.shard[0] == 0
        self.progress = progress and self.lead
        self.store = RunStore(root) if self.lead else None
        self.own = RunStore(scratch / f"rank-{self.shard[0]}")
        self.position = {c.key: i for i, c in enumerate(cases)}

    def all(
        self,
        editors: dict[str, Editor],
        configs: dict[str, MethodConfig],
        manifest: dict[str, Any],
        overwrite: bool,
        baseline_from: Sequence[str | Path],
    ) -> tuple[dict[str, dict[str, Any]], dict[str, list], dict[str, float]]:
        """The baseline, then each method: the rows (rank 0; empty elsewhere), the retention
        curves (none: no sequential protocol here) and this rank's preparation seconds."""
        pre = self.baseline(manifest, overwrite, baseline_from)
        rows = {BASELINE: _baseline_row(self.cases, pre)} if self.lead else {}
        prepared: dict[str, float] = {}
        for label, editor in editors.items():
            clock = time.perf_counter()
            editor.prepare(self.lm, configs[label])  # collective: the ranks share the statistics
            prepared[label] = time.perf_counter() - clock
            self.method(label, editor, configs[label], pre)
            rows[label] = distributed.on_rank_zero(functools.partial(self._row, label))
        return rows, {}, prepared

    def _row(self, label: str) -> dict[str, Any]:
        assert self.store is not None
        return _method_row(self.store, label, self.cases, self.options.protocol)[0]

    def _open(
        self, manifest: dict[str, Any], overwrite: bool, baseline_from: Sequence[str | Path]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Rank 0: the folder checked and its manifest written, as for a lone process; the
        unedited measurements of this run's cases it holds already, and those other folders
        lend (:func:`reusable_baseline`)."""
        assert self.store is not None
        _prepare_folder(self.store, overwrite)
        _check_manifest(self.store, manifest, overwrite)
        self.store.write_manifest(manifest)
        held = self.store.baseline.by_key()
        stored = {k: held[k]["pre"] for k in self.position if k in held}
        root = str(self.store.root)
        known = reusable_baseline(
            baseline_from, {**manifest, "out": root}, self.cases, self.fluency_keys
        )
        return stored, known

    def baseline(
        self, manifest: dict[str, Any], overwrite: bool, baseline_from: Sequence[str | Path]
    ) -> dict[str, dict[str, Any]]:
        """Each rank measures its own cases unedited; rank 0 stores them all, in a lone process's
        order (lent measurements first, then the new ones, each in case order). Returns the
        measurements this rank needs (rank 0: every case's)."""
        stored, known = distributed.on_rank_zero(
            lambda: self._open(manifest, overwrite, baseline_from)
        )
        ready = {**known, **stored}
        given = {c.key: ready[c.key] for c in self.mine if c.key in ready}
        failure = _attempt(lambda: self._measure_unedited(given))
        fresh = {k: r["pre"] for k, r in self.own.baseline.by_key().items() if k not in ready}
        parts = distributed.gather_to_rank_zero(fresh)
        measured = {k: v for part in parts or [] for k, v in part.items()}
        if self.store is not None:
            sink = self.store.baseline
            lent = [c.key for c in self.cases if c.key in known and c.key not in stored]
            new = [c.key for c in self.cases if c.key in measured]
            records = [*({"key": k, "pre": known[k]} for k in lent),
                       *({"key": k, "pre": measured[k]} for k in new)]  # fmt: skip
            failure = failure or _attempt(lambda: [sink.append(r) for r in records])
        distributed.raise_if_failed_anywhere(failure)
        return {**ready, **fresh, **measured}

    def _measure_unedited(self, given: dict[str, dict[str, Any]]) -> None:
        _baseline(self.lm, self.mine, self.options, self.own, self.fluency_keys, self.progress,
                  given)  # fmt: skip

    def method(
        self, label: str, editor: Editor, config: MethodConfig, pre: dict[str, dict[str, Any]]
    ) -> None:
        """Each rank runs its editor calls (records of a resumed run's finished cases are handed
        to it first, so they are skipped); rank 0 appends the new records in case order."""
        keys = set(self.position)

        def finished() -> dict[str, dict[str, Any]]:
            assert self.store is not None
            return {k: r for k, r in self.store.cases(label).by_key().items() if k in keys}

        done = distributed.on_rank_zero(finished)
        sink = self.own.cases(label)
        for case in self.mine:
            if case.key in done:
                sink.append(done[case.key])
        run = MethodRun(self.lm, editor, config, label, self.cases, pre, self.options, self.own,
                        frozenset(self.fluency_keys), self.progress, self.shard)  # fmt: skip

        def protocol() -> None:
            with distributed.independently():  # separate edits: no collective step inside
                run_protocol(run)

        failure = _attempt(protocol)
        fresh = [r for r in sink.read() if done.get(r["key"]) != r]
        parts = distributed.gather_to_rank_zero(fresh)
        if self.store is not None:
            records = sorted((r for part in parts or [] for r in part),
                             key=lambda r: self.position[r["key"]])  # fmt: skip
            target = self.store.cases(label)
            failure = failure or _attempt(lambda: [target.append(r) for r in records])
        distributed.raise_if_failed_anywhere(failure)


def _attempt(step: Callable[[], Any]) -> Exception | None:
    """Run ``step``; the error it raised, or None (a rank's failure is raised on every rank once
    the records it finished are safe)."""
    try:
        step()
    except Exception as error:
        return error
    return None


def evaluate(
    lm: LoadedModel,
    cases: Sequence[EvalCase],
    method: str | MethodSpec,
    config: ConfigLike = None,
    *,
    protocol: str | None = None,
    options: EvalOptions | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    baseline_from: Sequence[str | Path] = (),
) -> Summary:
    """Evaluate one method (see :func:`compare`); the summary has the rows ``unedited`` and the
    method's label."""
    spec = method if isinstance(method, MethodSpec) else MethodSpec(method, config)
    return compare(
        lm,
        cases,
        [spec],
        protocol=protocol,
        options=options,
        out=out,
        overwrite=overwrite,
        progress=progress,
        info=info,
        baseline_from=baseline_from,
    )


def _prepare_folder(store: RunStore, overwrite: bool) -> None:
    """Refuse a non-empty folder that is not an evaluation run; with ``overwrite``, delete the
    files of the run it holds (and nothing else)."""
    root = store.root
    if not root.exists() or not any(root.iterdir()):
        return
    old = store.manifest()
    if old is None:
        raise EvaluationError(
            f"{root} is not empty and holds no evaluation run; choose another out"
        )
    if not overwrite:
        return
    for name in (
        "run.json",
        "baseline.jsonl",
        "summary.json",
        "table.md",
        "metrics.png",
        "retention.png",
    ):
        (root / name).unlink(missing_ok=True)
    for label in old.get("methods", {}):
        store.clear_method(label)


def write_outputs(summary: Summary, store: RunStore) -> None:
    """summary.json, table.md and the plots, each written atomically."""
    atomic_write_json(store.root / "summary.json", summary.to_dict())
    atomic_write_text(store.root / "table.md", summary.markdown())
    plot_metrics(summary, store.root / "metrics.png")
    if summary.retention:
        plot_retention(summary, store.root / "retention.png")
