"""Train a MEND editor from a benchmark file and save it with the record of its training.

What ``lmscalpel train-editor`` does, callable from Python::

    records = read_edit_records("../shared/data/counterfact/train.json")
    trained = train_editor(lm, records, "runs/mend-smollm2")
    trained.folder, trained.training["best_validation"], trained.rows()

The records are the edit requests of every case of any layout
:func:`lmscalpel.data.datasets.read_dataset` reads; training is
:func:`~lmscalpel.methods.mend.train.train_mend` (Mitchell et al. 2022, "Fast Model Editing at
Scale"); the editor is written by :func:`~lmscalpel.methods.mend.checkpoint.save_editor`, whose
``editor.json`` keeps under ``training`` the data file, the full training config, the training
summary and the wall time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscalpel.core.requests import EditRequest
from lmscalpel.data.datasets import RecordProblem, read_dataset
from lmscalpel.methods.mend import MENDTrainConfig, TrainResult, save_editor, train_mend
from lmscalpel.models.loaded import LoadedModel

#: The validation scores each row of :meth:`TrainedEditor.rows` carries, in order: edit,
#: paraphrase and neighbourhood success, the locality drawdown and their combined score.
SCORES = ("es", "ps", "ns", "dd", "score")


@dataclass(frozen=True)
class EditRecords:
    """The edit requests read from ``source`` (of ``layout``), and the records skipped."""

    requests: list[EditRequest]
    source: Path
    layout: str
    problems: list[RecordProblem] = field(default_factory=list)


def read_edit_records(path: str | os.PathLike, layout: str = "auto") -> EditRecords:
    """Every edit request of every case in the benchmark file ``path`` (malformed records are
    skipped and listed in ``problems``, as :func:`~lmscalpel.data.datasets.read_dataset` does)."""
    dataset = read_dataset(path, layout)
    requests = [request for case in dataset.cases for request in case.requests]
    return EditRecords(requests, Path(path), dataset.layout, list(dataset.problems))


@dataclass(frozen=True)
class ValidationRow:
    """One line of the before/after comparison: who was scored, at which training step
    (``None`` for the unedited model), and its validation scores (keys :data:`SCORES`)."""

    label: str
    step: int | None
    scores: dict[str, float]


@dataclass
class TrainedEditor:
    """A trained editor saved in ``folder``: the training ``result``, and ``training``, the
    record written into ``editor.json``."""

    result: TrainResult
    folder: Path
    training: dict[str, Any]
    records: EditRecords

    def rows(self) -> list[ValidationRow]:
        """The unedited model, the untrained editor, the best trained one and, when the step
        scale chosen after training is not 1, the trained one at that scale (the default)."""
        result = self.result
        best_step = int(result.best["step"])
        rows = [
            ValidationRow("unedited model", None, _scores(result.unedited)),
            ValidationRow("untrained", 0, _scores(result.untrained)),
            ValidationRow("trained (best)", best_step, _scores(result.best)),
        ]
        if result.step_scale_scan and result.step_scale != 1.0:
            chosen = result.step_scale_scan[str(result.step_scale)]
            rows.append(
                ValidationRow(f"x{result.step_scale} (default)", best_step, _scores(chosen))
            )
        return rows


def _scores(row: dict[str, float]) -> dict[str, float]:
    return {key: float(row[key]) for key in SCORES}


def train_editor(
    lm: LoadedModel,
    records: EditRecords,
    out: str | os.PathLike,
    config: MENDTrainConfig | None = None,
    *,
    started: float | None = None,
    progress: bool = True,
) -> TrainedEditor:
    """Meta-train a MEND editor for ``lm`` on ``records`` and save it to ``out``.

    ``config``: the training settings (default: ``lm``'s family defaults). ``editor.json``'s
    ``training`` holds ``data`` (the records' file), ``config``, the summary of
    :meth:`~lmscalpel.methods.mend.train.TrainResult.summary` and ``command_seconds``, the wall
    time since ``started`` (a :func:`time.monotonic` reading; default: this call's start, pass
    an earlier one to count loading the model too). The base model is not modified.
    """
    started = time.monotonic() if started is None else started
    config = config or MENDTrainConfig.for_model(lm.model_type)
    result = train_mend(lm, records.requests, config, progress=progress)
    training = {
        "data": str(records.source),
        "config": config.to_dict(),
        **result.summary(),
        "command_seconds": round(time.monotonic() - started, 1),
    }
    folder = save_editor(result.network, lm, out, training)
    return TrainedEditor(result=result, folder=Path(folder), training=training, records=records)
