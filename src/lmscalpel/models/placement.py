"""Where a model's weights live: devices, dtypes, and models dispatched by accelerate.

``load_model(device=..., dtype=...)`` takes the names users type (``"auto"``, ``"cuda:1"``,
``"bf16"``) and :func:`resolve_device` / :func:`resolve_dtype` turn them into torch objects or
say clearly why not. A model loaded with ``device_map`` is spread by accelerate over devices, the
CPU and the disk; accelerate's hooks move each module's weights to where it runs and back. Its
offloaded parameters are placeholders on the ``meta`` device whose values live in the hooks'
weight maps: reading them (fingerprints) goes through :func:`parameter_values`, and editing them
is refused (:func:`check_resident`), because a change to a placeholder would be lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn

from lmscalpel.core.config import ConfigError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


class PlacementError(ConfigError):
    """A device, dtype or placement cannot be used as asked; the message says why."""


class OffloadedWeightError(PlacementError):
    """An edit would change a weight that accelerate keeps offloaded (CPU or disk)."""


def _accelerators() -> dict[str, bool]:
    mps = getattr(torch.backends, "mps", None)
    return {"cuda": torch.cuda.is_available(), "mps": bool(mps and mps.is_available())}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (a CUDA GPU, else Apple's MPS, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``, ``"mps"``, or a ``torch.device``; one that is not there is refused."""
    if device is None or device == "auto":
        present = _accelerators()
        return torch.device("cuda" if present["cuda"] else "mps" if present["mps"] else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise PlacementError(
            f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps"
        ) from None
    present = _accelerators()
    if chosen.type == "cuda":
        if not present["cuda"]:
            raise PlacementError(f"device {device!r} asked for, but no CUDA GPU is available")
        count = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= count:
            raise PlacementError(f"device {device!r} asked for, but there are {count} GPU(s)")
    elif chosen.type == "mps" and not present["mps"]:
        raise PlacementError(f"device {device!r} asked for, but MPS is not available")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise PlacementError(f"unsupported device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return chosen


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """A parameter dtype from its name (float32/fp32, bfloat16/bf16, float16/fp16/half) or a
    floating ``torch.dtype``; ``None`` is float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise PlacementError(f"unsupported dtype {dtype}: use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in DTYPES:
        raise PlacementError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return DTYPES[name]


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate spread the model with a device map (its hooks place the weights)."""
    return bool(getattr(model, "hf_device_map", None))


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the token embeddings' device, or, when accelerate offloaded them, the
    device their hook runs them on."""
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight
    if weight.device.type != "meta":
        return weight.device
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device if device is not None else "cpu")


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def offloaded_parameters(model: nn.Module) -> list[str]:
    """The parameters accelerate keeps offloaded (placeholders on the meta device)."""
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


def check_resident(model: nn.Module, names: Iterable[str], what: str = "this edit") -> None:
    """Refuse, naming them, parameters that accelerate keeps offloaded."""
    offloaded = [n for n in names if model.get_parameter(n).device.type == "meta"]
    if offloaded:
        raise OffloadedWeightError(
            f"{what} would change {', '.join(offloaded)}, which accelerate keeps offloaded "
            "(CPU or disk) in this device map; keep the edited layers resident, e.g. "
            "device_map={..., 'model.layers.L': 0} or a max_memory that fits them"
        )


def parameter_values(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``named_parameters()`` with real values: an offloaded parameter is read from its hook's
    weight map (onloaded to the CPU while the caller looks at it, then offloaded again)."""
    for name, param in model.named_parameters():
        if param.device.type != "meta":
            yield name, param
            continue
        owner, leaf = _owner(model, name)
        if not has_offloaded_params(owner):
            raise PlacementError(f"{name} is a placeholder (meta) that no offload hook holds")
        with align_module_device(owner, torch.device("cpu")):
            yield name, getattr(owner, leaf)
