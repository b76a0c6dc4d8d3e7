"""lmscalpel: minimally invasive surgery on language models.

import lmscalpel as ls
lm = ls.load_model()                       # embedded SmolLM2-135M-Instruct, offline
request = ls.EditRequest(prompt="The Eiffel Tower is located in the city of",
                         subject="Eiffel Tower", target_new="Rome", target_true="Paris")
patch = ls.edit(lm, request, method="ft-l") # applied; patch.revert() undoes it exactly
patch.save("eiffel.patch")
"""

from lmscalpel.core.config import ConfigError, MethodConfig
from lmscalpel.core.requests import (
    EditRequest,
    EditRequestError,
    LocalityProbe,
    PortabilityProbe,
    load_requests,
    save_requests,
)
from lmscalpel.core.version import __version__
from lmscalpel.editing import edit, validate_requests
from lmscalpel.guard import Guard, GuardRejected, GuardReport
from lmscalpel.methods import available_methods, get_editor
from lmscalpel.models import LoadedModel, load_model, wrap_model
from lmscalpel.patch import NonFiniteDeltaError, Patch, PatchError, PatchMismatchError
from lmscalpel.scoring import TargetScore, generate, score_targets, top_tokens

__all__ = [
    "ConfigError",
    "EditRequest",
    "EditRequestError",
    "Guard",
    "GuardRejected",
    "GuardReport",
    "LoadedModel",
    "LocalityProbe",
    "MethodConfig",
    "NonFiniteDeltaError",
    "Patch",
    "PatchError",
    "PatchMismatchError",
    "PortabilityProbe",
    "TargetScore",
    "__version__",
    "available_methods",
    "edit",
    "generate",
    "get_editor",
    "load_model",
    "load_requests",
    "save_requests",
    "score_targets",
    "top_tokens",
    "validate_requests",
    "wrap_model",
]
