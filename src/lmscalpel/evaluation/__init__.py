"""Evaluation: did the edit take, generalise, stay local, propagate, and keep the model fluent?

    from lmscalpel import load_model
    from lmscalpel.evaluation import load_cases, evaluate, compare

    lm = load_model()
    cases = load_cases("../shared/data/counterfact/edit.json", n=50)
    summary = compare(lm, cases, ["ft-l", "ft-m"], out="runs/ft")  # or evaluate(lm, cases, "ft-l")
    summary.rows["unedited"]["ES"], summary.rows["ft-l"]["ES"], summary.rows["ft-l"]["NS"]

Modules, one idea each: :mod:`.metrics` (definitions), :mod:`.measure` (batched measurement
through :mod:`lmscalpel.scoring`), :mod:`.aggregate` (measurements -> metrics -> rows),
:mod:`.protocols` (single, batch, sequential, run by a :class:`~.protocols.MethodRun`),
:mod:`.store` (resumable output folder), :mod:`.runner` (the pipeline), :mod:`.summary` (its
result), :mod:`.report` and :mod:`.plots` (tables and PNGs), :mod:`.resources` (time and peak
memory of edits). Benchmark files become cases in :mod:`lmscalpel.data` (one module per layout),
whose loaders are re-exported here. See docs/evaluation.md.
"""

from lmscalpel.data.cases import EvalCase, select_cases
from lmscalpel.data.datasets import (
    LAYOUTS,
    Dataset,
    DatasetError,
    RecordProblem,
    load_cases,
    read_dataset,
)
from lmscalpel.evaluation.aggregate import aggregate, case_metrics
from lmscalpel.evaluation.measure import measure
from lmscalpel.evaluation.options import PROTOCOLS, EvalOptions, EvaluationError
from lmscalpel.evaluation.report import console_table, markdown_table
from lmscalpel.evaluation.runner import MethodSpec, compare, evaluate
from lmscalpel.evaluation.summary import BASELINE, Summary

__all__ = [
    "BASELINE",
    "LAYOUTS",
    "PROTOCOLS",
    "Dataset",
    "DatasetError",
    "EvalCase",
    "EvalOptions",
    "EvaluationError",
    "MethodSpec",
    "RecordProblem",
    "Summary",
    "aggregate",
    "case_metrics",
    "compare",
    "console_table",
    "evaluate",
    "load_cases",
    "markdown_table",
    "measure",
    "read_dataset",
    "select_cases",
]
