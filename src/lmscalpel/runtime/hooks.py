"""Context managers that read or rewrite what a module sees and produces.

Every hook installed here is removed when the ``with`` block ends, also when the block raises.
Modules are named by their dotted path in ``model.named_modules()`` (an adapter supplies the
names, so nothing here knows an architecture).

    with capture(model, ["model.layers.3.mlp.down_proj"], inputs=True) as seen:
        model(input_ids)
    keys = seen["model.layers.3.mlp.down_proj"].input        # (batch, seq, d_mlp)

    with edit_output(model, "model.layers.3.mlp", lambda h: h + delta):
        model(input_ids)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lmscalpel.models.adapter import first_tensor, replace_first_tensor


class StopForward(Exception):  # a control-flow signal, not an error
    """Raised inside a forward pass to skip the layers after the last captured module."""


@dataclass
class Captured:
    """What one module saw (``input``: its first positional argument) and produced."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _keep(tensor: torch.Tensor, detach: bool, clone: bool) -> torch.Tensor:
    if detach:
        tensor = tensor.detach()
    return tensor.clone() if clone else tensor


@contextmanager
def capture(
    model: nn.Module,
    names: str | Sequence[str],
    *,
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
    clone: bool = False,
    stop: bool = False,
) -> Iterator[dict[str, Captured]]:
    """Record the input and/or output hidden tensor of each named module during the block.

    With ``stop=True`` the forward pass is cut short right after the last named module has run
    (``StopForward`` is raised there and swallowed on exit), which saves the cost of the layers
    above it. With ``detach=False`` the captured tensors keep their autograd graph.
    """
    names = [names] if isinstance(names, str) else list(names)
    records = {name: Captured() for name in names}
    pending = set(names)
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            record = records[name]
            if inputs:
                value = args[0] if args else next(iter(kwargs.values()))
                record.input = _keep(first_tensor(value), detach, clone)
            if outputs:
                record.output = _keep(first_tensor(output), detach, clone)
            pending.discard(name)
            if stop and not pending:
                raise StopForward

        return hook

    try:
        for name in names:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield records
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def edit_output(
    model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Replace the named module's hidden-state output by ``fn(output)`` during the block."""
    with edit_outputs(model, {name: fn}):
        yield


@contextmanager
def edit_outputs(
    model: nn.Module,
    edits: dict[str, Callable[..., torch.Tensor]],
    *,
    with_inputs: bool = False,
) -> Iterator[None]:
    """:func:`edit_output` for several modules at once.

    With ``with_inputs`` each function is called as ``fn(output, input)``, ``input`` being the
    module's first argument: e.g. a linear layer's output plus ``ΔW @ input`` realises a weight
    change ``ΔW`` without touching the weight.
    """
    handles = []

    def make_hook(fn: Callable[..., torch.Tensor]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            hidden = first_tensor(output)
            if with_inputs:
                value = args[0] if args else next(iter(kwargs.values()))
                return replace_first_tensor(output, fn(hidden, first_tensor(value)))
            return replace_first_tensor(output, fn(hidden))

        return hook

    try:
        for name, fn in edits.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(make_hook(fn), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def add_at_positions(
    vector: torch.Tensor, positions: Sequence[int] | torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``edit_output`` function that adds ``vector`` (d,) at one position per batch row.

    ``positions[b]`` is the token index in row ``b``; the result is a new tensor, so autograd
    flows into ``vector``.
    """

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.as_tensor(positions, device=hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        mask = torch.zeros(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
        mask[rows, pos] = 1.0
        return hidden + mask.unsqueeze(-1) * vector.to(hidden.dtype)

    return fn


def replace_at_positions(
    values: torch.Tensor,
    positions: Sequence[int] | torch.Tensor,
    rows: Sequence[int] | torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``edit_output`` function that overwrites one position in each of some batch rows.

    Row ``rows[i]`` (default: row ``i``, for every row) gets ``values[i]`` at token
    ``positions[i]``; ``values`` is (len(positions), d), or (d,) for the same vector everywhere.
    Everything else is left as computed. Causal tracing uses it to copy clean states into
    corrupted runs, a different (token, state) per row.
    """

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.as_tensor(positions, device=hidden.device)
        which = (
            torch.arange(len(pos), device=hidden.device)
            if rows is None
            else torch.as_tensor(rows, device=hidden.device)
        )
        new = values.to(device=hidden.device, dtype=hidden.dtype).expand(len(pos), -1)
        out = hidden.clone()
        out[which, pos] = new
        return out

    return fn


@contextmanager
def resume_at(
    model: nn.Module, skipped: Sequence[str], resume: str, hidden: torch.Tensor
) -> Iterator[None]:
    """Run forward passes from block ``resume`` on, feeding it ``hidden`` as its input.

    The blocks named in ``skipped`` (those below ``resume``) pass their input through instead of
    computing, and ``resume`` receives ``hidden`` (the same batch's hidden state entering it, kept
    from an earlier pass) as its first argument. When only the upper layers change between passes
    (an edit of layer ``l`` and above), this saves the cost of everything below. Decoder blocks
    must take the hidden state as their first argument and return it as a tensor, as all the
    supported families do.
    """
    modules = [model.get_submodule(name) for name in skipped]

    def passthrough(hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states

    def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: hidden}

    handle = model.get_submodule(resume).register_forward_pre_hook(feed, with_kwargs=True)
    try:
        for module in modules:
            module.forward = passthrough
        yield
    finally:
        handle.remove()
        for module in modules:
            module.__dict__.pop("forward", None)
