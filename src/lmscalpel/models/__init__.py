"""Loading models offline and mapping their architecture to one naming scheme."""

from lmscalpel.models.adapter import (
    ArchitectureSpec,
    ModelAdapter,
    UnsupportedArchitectureError,
    register_architecture,
    supported_model_types,
)
from lmscalpel.models.fingerprint import model_fingerprint, tensor_digest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelNotAvailableError,
    UnsafeModelError,
    load_model,
    wrap_model,
)

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ArchitectureSpec",
    "LoadedModel",
    "ModelAdapter",
    "ModelNotAvailableError",
    "UnsafeModelError",
    "UnsupportedArchitectureError",
    "load_model",
    "model_fingerprint",
    "register_architecture",
    "supported_model_types",
    "tensor_digest",
    "wrap_model",
]
