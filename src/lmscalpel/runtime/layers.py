"""Run the model from layer ``l`` upward, given the hidden state entering it.

An intervention at layer ``l`` (an edit of its weights, a vector added to its output) cannot change
what layers ``0..l-1`` compute, so a method that evaluates many interventions needs the lower
layers only once. :func:`from_layer` is the one way to skip them: inside it, every forward pass of
the model runs only the blocks ``>= l``, block ``l`` receiving the given hidden state. The model's
own forward pass still does everything else (embeddings, masks, position embeddings, the key/value
cache, the final norm), so any caller — scoring, an anchored batch, MEND's edited passes, the
recorded residual stream — works unchanged inside it, with its hooks active.

The skipped blocks are swapped for a stub in their ``ModuleList`` for the duration; no module's
``forward`` is touched, so hooks that wrap ``forward`` (accelerate's offloading and device
placement) stay intact.

    with from_layer(lm, 12, hidden):              # hidden: (B, S, d), the input of layer 12
        out = run_body(lm, ids)                   # layers 0..11 do not compute
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmscalpel.models.adapter import with_hidden_input
from lmscalpel.models.loaded import LoadedModel


class _Skipped(nn.Module):
    """Stands in for a decoder block below the first one run: returns the given hidden state."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.hidden


@contextmanager
def from_layer(lm: LoadedModel, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, forward passes of ``lm`` run only layers ``>= layer``; layer ``layer``
    receives ``hidden`` (B, S, d) as its input, whatever the embeddings give.

    ``hidden`` must have the batch and sequence shape of the inputs the model is called with
    (it usually was kept from an earlier pass over the same tokens). Gradients flow into it if it
    requires them. ``layer == num_layers`` skips every block: the pass then ends with the final
    norm of ``hidden``. The blocks are put back on exit, also on error.
    """
    adapter = lm.adapter
    blocks = adapter.layer_list
    if not 0 <= layer <= len(blocks):
        raise IndexError(f"layer {layer} out of range 0..{len(blocks)}")
    entries = blocks._modules  # written directly: ModuleList.__setitem__ costs more than a layer
    saved = list(entries.values())[:layer]
    stub = _Skipped(hidden)
    handle = None
    if layer < len(blocks):

        def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return with_hidden_input(args, kwargs, hidden)

        handle = blocks[layer].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        for i in range(layer):
            entries[str(i)] = stub
        yield
    finally:
        if handle is not None:
            handle.remove()
        for i, block in enumerate(saved):
            entries[str(i)] = block
