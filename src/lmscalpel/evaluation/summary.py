"""The result of an evaluation run: one row of metrics per method, the unedited baseline first.

:class:`Summary` is plain data (``summary.json`` is :meth:`Summary.to_dict`); the tables and
plots that show it live in :mod:`lmscalpel.evaluation.report` and :mod:`lmscalpel.evaluation.plots`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmscalpel.evaluation.aggregate import BASELINE
from lmscalpel.evaluation.report import markdown_table

__all__ = ["BASELINE", "Summary"]


@dataclass
class Summary:
    """The result of a run.

    ``rows``: ``{"unedited": {...}, label: {...}, ...}``, each a dict of metric columns (see
    :mod:`lmscalpel.evaluation.aggregate`; fractions in [0, 1], ``fluency`` in bits,
    ``seconds_per_edit``, ``peak_memory_mb``, ``memory_overhead_mb``, ``n_cases``).
    ``retention``: for the sequential protocol, per method, one dict per checkpoint
    ``{"edits": k, **metrics}``. ``info``: data, model, options, method configurations,
    left-out cases, output folder, wall time. ``batch_size``: cases per editor call (``None``:
    not recorded, as in summaries of older versions).
    """

    rows: dict[str, dict[str, float]]
    protocol: str
    n_cases: int
    retention: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None

    @property
    def methods(self) -> list[str]:
        return [k for k in self.rows if k != BASELINE]

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "n_cases": self.n_cases,
            "batch_size": self.batch_size,
            "rows": self.rows,
            "retention": self.retention,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Summary:
        """The summary :meth:`to_dict` wrote (``summary.json``)."""
        return cls(
            rows=data["rows"],
            protocol=data["protocol"],
            n_cases=data["n_cases"],
            retention=data.get("retention", {}),
            info=data.get("info", {}),
            batch_size=data.get("batch_size"),
        )

    def markdown(self) -> str:
        """The full table (see :func:`~lmscalpel.evaluation.report.markdown_table`)."""
        return markdown_table(self)
