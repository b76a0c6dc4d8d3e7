"""Where the project's shared benchmark data lives (CounterFact, zsRE, the known facts...).

The data is not part of the package: it sits in ``shared/data`` beside the project's checkout, or
wherever ``$LMSCALPEL_DATA`` points. Loaders that have a default file (IKE's demonstration pool,
causal tracing's known facts) look it up here.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "LMSCALPEL_DATA"


def checkout_data_dir() -> Path:
    """The ``shared/data`` folder beside the project's checkout (it need not exist)."""
    # src/lmscalpel/data/shared.py -> the checkout is parents[3], shared/ sits beside it
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def shared_data_dir() -> Path:
    """``$LMSCALPEL_DATA``, or :func:`checkout_data_dir` (the folder need not exist)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return checkout_data_dir()


def shared_data_file(relative: str | os.PathLike) -> Path:
    """The file ``relative`` (e.g. ``counterfact/train.json``) in :func:`shared_data_dir` (it need
    not exist)."""
    return shared_data_dir() / relative
