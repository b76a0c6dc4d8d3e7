"""Content fingerprints of tensors and models.

A patch records the exact digest of every tensor it touches, so it can refuse to apply to a model
whose weights differ. Caches (second-moment statistics, trained editors) are keyed by a model's
fingerprint: a digest of its configuration, parameter names and shapes and a fixed sample of
every tensor's values — cheap to compute yet different for any two real checkpoints.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from lmscalpel.models.placement import parameter_values

_SAMPLE = 1 << 16


def _bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's exact bytes, dtype and shape."""
    digest = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(_bytes(tensor))
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A short digest identifying a model's architecture and weights (see module docstring);
    the same for a model dispatched by accelerate, whose offloaded weights are read from disk."""
    digest = hashlib.sha256(str(getattr(model.config, "model_type", type(model).__name__)).encode())
    with torch.no_grad():
        for name, param in parameter_values(model):
            flat = param.reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
            digest.update(_bytes(flat[::step]))
    return digest.hexdigest()[:16]
