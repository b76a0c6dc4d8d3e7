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
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
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
from lmscalpel.evaluation.protocols import MethodRun, run_protocol
from lmscalpel.evaluation.store import RunStore
from lmscalpel.evaluation.summary import Summary
from lmscalpel.methods import get_editor
from lmscalpel.models.loaded import LoadedModel

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
    with tempfile.TemporaryDirectory(prefix="lmscalpel-eval-") as scratch:
        store = RunStore(out if out is not None else scratch)
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
        _prepare_folder(store, overwrite)
        _check_manifest(store, manifest, overwrite)
        store.write_manifest(manifest)
        fluency_keys = {c.key for c in cases[: options.fluency_cases]}
        known = reusable_baseline(
            baseline_from, {**manifest, "out": str(store.root)}, cases, fluency_keys
        )
        pre = _baseline(lm, cases, options, store, fluency_keys, progress, known)
        rows = {BASELINE: aggregate(case_metrics(pre[c.key], None, c.tags) for c in cases)}
        rows[BASELINE]["n_cases"] = len(cases)
        retention: dict[str, list[dict[str, float]]] = {}
        prepared: dict[str, float] = {}
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
            },
        )
        if out is not None:
            write_outputs(summary, store)
    return summary


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
