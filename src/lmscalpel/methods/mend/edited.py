"""Run the model as if each batch row's own edit ΔW were applied — without touching a weight.

Meta-training needs the edited model's outputs for many different edits at once, and gradients
through ΔW into the editor network. Since ΔW_e = left_e @ right_e is low-rank, an edited linear
layer's output on row r (owned by edit e = owner[r]) is

    y' = W x + ΔW_e x = y + left_e (right_e x),

which a tap adds to the module's output (:func:`lmscalpel.runtime.hooks.tap`, a ``replace`` with
the module's input). One batched forward pass thus evaluates every edit of a meta-batch; the base
model's parameters are never modified, so nothing needs restoring even if the pass fails (the
hooks are removed on exit). Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1 (the edited
parameters W̃ = W - η ∇̃W used in the loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lmscalpel.methods.mend.network import LowRank
from lmscalpel.models.adapter import module_of
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Tap, tap


def _adder(left: torch.Tensor, right: torch.Tensor, owner: torch.Tensor) -> Callable:
    def add(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r = right[owner].to(x.dtype)  # (R, T, in)
        lft = left[owner].to(x.dtype)  # (R, out, T)
        coeff = torch.einsum("rsi,rti->rst", x, r)
        return output + torch.einsum("rst,rot->rso", coeff, lft).to(output.dtype)

    return add


@contextmanager
def edited_forward(
    lm: LoadedModel, factors: dict[str, LowRank], owner: torch.Tensor
) -> Iterator[None]:
    """Within the block, row ``r`` of every forward pass sees the weights W + ΔW_{owner[r]}.

    ``factors``: weight name -> (left (E, out, T), right (E, T, in)); ``owner``: (R,) edit index
    of each batch row.
    """
    taps = {
        module_of(name): Tap(replace=_adder(left, right, owner.to(left.device)), with_input=True)
        for name, (left, right) in factors.items()
    }
    with tap(lm.model, taps):
        yield
