"""Loading models offline and mapping their architecture to one naming scheme."""

from .adapter import (
    ArchitectureSpec,
    ModelAdapter,
    UnsupportedArchitectureError,
    register_architecture,
    supported_model_types,
)
from .fingerprint import model_fingerprint, tensor_digest
from .loaded import LoadedModel
from .loading import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelNotAvailableError,
    lmscalpel_home,
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
    "UnsupportedArchitectureError",
    "lmscalpel_home",
    "load_model",
    "model_fingerprint",
    "register_architecture",
    "supported_model_types",
    "tensor_digest",
    "wrap_model",
]
