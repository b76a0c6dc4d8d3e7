"""IKE's demonstration pool: edits with a paraphrase and a locality probe, read from any dataset
file :func:`lmscalpel.data.datasets.read_dataset` reads (CounterFact's training split by
default)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from lmscalpel.core.requests import EditRequest, EditRequestError
from lmscalpel.data.datasets import read_dataset
from lmscalpel.data.shared import DATA_ENV, shared_data_file
from lmscalpel.methods.ike.config import DEFAULT_POOL


def default_pool_path() -> Path:
    """``counterfact/train.json`` in the shared data folder (it need not exist)."""
    return shared_data_file(DEFAULT_POOL)


@functools.lru_cache(maxsize=4)
def _read_pool(path: Path, mtime: float) -> tuple[EditRequest, ...]:
    cases = read_dataset(path).cases
    return tuple(r for case in cases for r in case.requests if r.paraphrases and r.locality)


def load_pool(path: str | os.PathLike | None = None, size: int | None = None) -> list[EditRequest]:
    """The demonstration pool: edits with at least one paraphrase and one locality probe.

    ``path`` is any dataset :func:`lmscalpel.data.datasets.read_dataset` reads (CounterFact in
    either layout, zsRE, KnowEdit, lmscalpel requests...); ``None`` reads
    :func:`default_pool_path`. ``size`` keeps the first records only. Read files are memoised
    (per path and modification time).
    """
    resolved = Path(path).expanduser() if path is not None else default_pool_path()
    if not resolved.is_file():
        hint = (
            "set the IKE config's `pool` to a dataset file (e.g. CounterFact's train.json), or "
            f"{DATA_ENV} to the folder holding {DEFAULT_POOL}"
        )
        raise FileNotFoundError(f"IKE demonstration pool not found at {resolved}: {hint}")
    resolved = resolved.resolve()
    pool = list(_read_pool(resolved, resolved.stat().st_mtime))
    if not pool:
        raise EditRequestError(f"{resolved} holds no edit with a paraphrase and a locality probe")
    return pool[:size] if size else pool
