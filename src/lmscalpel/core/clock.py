"""The one way lmscalpel writes a time: UTC, ISO 8601 (patches, editor checkpoints, traced
peaks, the service journal all record when they were made)."""

from __future__ import annotations

import datetime as _dt


def utc_now(timespec: str = "seconds") -> str:
    """Now in UTC as ISO 8601, e.g. ``2026-12-01T17:05:09+00:00`` (``timespec`` as for
    :meth:`datetime.datetime.isoformat`: ``"seconds"``, ``"milliseconds"`` ...)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)
