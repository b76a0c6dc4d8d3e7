"""The live editing service: patch a running model over HTTP, journal every change, survive crashes.

:func:`create_app` (FastAPI, :mod:`.app`) serves an :class:`EditingService` (:mod:`.engine`: the
work, under a readers-writer lock, :mod:`.locking`) whose edits and reverts are written to a
:class:`Journal` (:mod:`.journal`) before they are acknowledged and replayed on start. Request
bodies are :mod:`.schemas`. ``lmscalpel serve`` runs it with uvicorn.
"""

from lmscalpel.service.app import create_app
from lmscalpel.service.engine import EditingService, Limits, ServiceError
from lmscalpel.service.journal import Journal, JournalError
from lmscalpel.service.locking import ReadWriteLock

__all__ = [
    "EditingService",
    "Journal",
    "JournalError",
    "Limits",
    "ReadWriteLock",
    "ServiceError",
    "create_app",
]
