"""Loaders: benchmark files in their published layouts -> :class:`~lmscalpel.data.cases.EvalCase` s.

Supported layouts (detected from the records, or named with ``layout=``), one module each:

===============  ====================================================================
``counterfact``  EasyEdit's one-record-per-edit CounterFact (:mod:`.counterfact`)
``rome``         ROME's original CounterFact layout and its course variant (:mod:`.counterfact`)
``zsre``         zsRE in the MEND layout (:mod:`.zsre`)
``knowedit``     KnowEdit, with portability and locality kinds (:mod:`.knowedit`)
``mquake``       MQuAKE: several rewrites per case, multi-hop questions (:mod:`.mquake`)
``knowns``       the known facts of ROME's causal tracing as counterfactual edits (:mod:`.knowns`)
``requests``     lmscalpel's own JSON / JSONL of :class:`~lmscalpel.core.requests.EditRequest` s;
                 requests sharing a ``case_id`` form one case (:mod:`.reading`)
===============  ====================================================================

Record fields are read through :mod:`.fields`; files through :mod:`.reading`, which never stops
on a malformed record: it is reported as a :class:`RecordProblem` (index and reason), logged, and
kept in :attr:`Dataset.problems`. This module gathers the public names in one place.
"""

from __future__ import annotations

from lmscalpel.data.counterfact import parse_counterfact, parse_rome
from lmscalpel.data.fields import Malformed, RecordProblem
from lmscalpel.data.knowedit import KNOWEDIT_PORTABILITY, parse_knowedit
from lmscalpel.data.knowns import parse_knowns
from lmscalpel.data.mquake import parse_mquake
from lmscalpel.data.reading import (
    LAYOUTS,
    PARSERS,
    Dataset,
    DatasetError,
    detect_layout,
    load_cases,
    read_dataset,
)
from lmscalpel.data.zsre import parse_zsre

__all__ = [
    "KNOWEDIT_PORTABILITY",
    "LAYOUTS",
    "PARSERS",
    "Dataset",
    "DatasetError",
    "Malformed",
    "RecordProblem",
    "detect_layout",
    "load_cases",
    "parse_counterfact",
    "parse_knowedit",
    "parse_knowns",
    "parse_mquake",
    "parse_rome",
    "parse_zsre",
    "read_dataset",
]
