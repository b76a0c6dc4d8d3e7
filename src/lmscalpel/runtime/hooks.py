"""The one hook primitive: read or rewrite what modules see and produce during a forward pass.

:func:`tap` installs one forward hook per named module and removes every one of them when the
``with`` block ends, also when the block raises. Modules are named by their dotted path in
``model.named_modules()`` (an adapter supplies the names, so nothing here knows an architecture).
What a :class:`Tap` asks for:

* ``input`` / ``output``: keep the module's input hidden tensor (its first argument, see
  :func:`lmscalpel.models.adapter.hidden_input`) and/or its output hidden tensor;
* ``replace``: rewrite the output hidden tensor, ``replace(output)`` (or ``replace(output,
  input)`` with ``with_input``; e.g. ``output + ΔW @ input`` realises a weight change without
  touching the weight);
* ``grad``: keep the output with its autograd graph; an output that does not require grad yet
  becomes a leaf that does, so ``torch.autograd.grad(loss, seen[name].output)`` returns
  ∂loss/∂output (MEND's δ);
* ``stop=True`` (for the whole call): end the forward pass as soon as every tapped module has run,
  skipping the layers above.

::

    with tap(model, {"model.layers.3.mlp.down_proj": Tap(input=True)}, stop=True) as seen:
        model(input_ids)
    keys = seen["model.layers.3.mlp.down_proj"].input          # (batch, seq, d_mlp)

    with tap(model, {"model.layers.3.mlp": Tap(replace=lambda h: h + delta)}):
        model(input_ids)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lmscalpel.models.adapter import first_tensor, hidden_input, replace_first_tensor


class StopForward(Exception):  # a control-flow signal, not an error
    """Raised inside a forward pass to skip the layers after the last tapped module."""


@dataclass(frozen=True)
class Tap:
    """What :func:`tap` does at one module (see the module docstring).

    ``input``: keep the input hidden tensor (always detached). ``output``: keep the output hidden
    tensor (after ``replace``; detached unless ``grad``). ``replace``: a function of the output
    (and, with ``with_input``, of the input as the module received it, graph included) returning
    the new output hidden tensor. ``grad``: keep the output's graph, making it a leaf that
    requires grad when it does not yet (and grad mode is on). ``clone``: keep copies, not the tensors themselves (for a
    module called several times, or an output that a later in-place operation would change).
    """

    input: bool = False
    output: bool = False
    replace: Callable[..., torch.Tensor] | None = None
    with_input: bool = False
    grad: bool = False
    clone: bool = False


@dataclass
class Seen:
    """What one tapped module received (``input``) and produced (``output``) at its last call;
    ``None`` for what was not asked for, or when the module never ran."""

    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def _hook(name: str, spec: Tap, seen: Seen, done: Callable[[str], None]) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        new = None
        if spec.input or spec.with_input:
            received = hidden_input(args, kwargs)
        if spec.input:
            kept = received.detach()
            seen.input = kept.clone() if spec.clone else kept
        if spec.replace is not None or spec.grad or spec.output:
            hidden = first_tensor(output)
            if spec.replace is not None:
                new = spec.replace(hidden, received) if spec.with_input else spec.replace(hidden)
                hidden = new
            if spec.grad and not hidden.requires_grad and torch.is_grad_enabled():
                new = hidden = hidden.detach().requires_grad_(True)
            if spec.output:
                kept = hidden if spec.grad else hidden.detach()
                seen.output = kept.clone() if spec.clone and not spec.grad else kept
        done(name)
        return None if new is None else replace_first_tensor(output, new)

    return hook


@contextmanager
def tap(
    model: nn.Module, taps: Mapping[str, Tap], *, stop: bool = False
) -> Iterator[dict[str, Seen]]:
    """Tap the named modules of ``model`` during the block; yields ``{name: Seen}``.

    With ``stop=True`` the forward pass ends right after the last tapped module has run (a
    :class:`StopForward` is raised there and swallowed on exit, so the rest of the ``with`` body
    is skipped too: call the model last in it). The hooks are removed on exit, also on error.
    """
    seen = {name: Seen() for name in taps}
    pending = set(taps)
    signal = StopForward()

    def done(name: str) -> None:
        pending.discard(name)
        if stop and not pending:
            raise signal

    handles = []
    try:
        for name, spec in taps.items():
            module = model.get_submodule(name)
            hook = _hook(name, spec, seen[name], done)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield seen
    except StopForward as error:
        if error is not signal:
            raise  # another tap's stop: let it reach its own context
    finally:
        for handle in handles:
            handle.remove()
        # The signal's traceback holds the forward pass's frames (every activation in them) and
        # ``done``'s frame, whose closure holds the signal: a reference cycle that only the
        # garbage collector would free, long after the activations should have gone.
        signal.__traceback__ = None


def add_at_positions(
    vector: torch.Tensor, positions: Sequence[int] | torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``replace`` function that adds ``vector`` (d,) at one position per batch row.

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
    """A ``replace`` function that overwrites one position in each of some batch rows.

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
