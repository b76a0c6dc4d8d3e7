"""The raw material of a MEND edit: each token's layer input u and output gradient δ.

A linear layer y = W u (+ b) applied at every token t of a batch has the weight gradient

    ∇_W L = Σ_t δ_t u_tᵀ,    δ_t = ∂L/∂y_t,

a sum of rank-one outer products (Mitchell et al. 2022, "Fast Model Editing at Scale", §3.1). MEND
transforms the pairs (u_t, δ_t) — d_in + d_out numbers per token — instead of the d_out x d_in
gradient. This module records them for the edited matrices with hooks: a forward hook keeps each
module's input u, and the module's output is made a differentiable node whose gradient
:func:`torch.autograd.grad` returns as δ. Only the layers from the lowest edited matrix upwards
take part in the backward pass; the base model's parameters never require grad.

Shapes are in the adapter's (out, in) convention whatever the storage (GPT-2's ``Conv1D`` stores
(in, out); see :meth:`ModelAdapter.to_storage`), because u and δ are read at the module's input and
output, not from its weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lmscalpel.core.config import ConfigError
from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.base import resolve_layers
from lmscalpel.models.adapter import ModelAdapter, first_tensor, module_of, replace_first_tensor
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Captured
from lmscalpel.scoring import TeacherForcedBatch, build_batch, hidden_states


def edited_parameter_names(
    adapter: ModelAdapter, layers: Sequence[int], matrices: str = "mlp"
) -> list[str]:
    """Weight names of the matrices MEND edits: every MLP matrix (``"mlp"``) or only the MLP
    output matrix (``"mlp_out"``) of each layer in ``layers`` (negative counts from the top)."""
    if matrices not in ("mlp", "mlp_out"):
        raise ConfigError(f"matrices must be 'mlp' or 'mlp_out', got {matrices!r}")
    names = []
    for layer in resolve_layers(list(layers), (), adapter.num_layers):
        if matrices == "mlp":
            names.extend(adapter.mlp_in_weight_names(layer))
        names.append(adapter.mlp_out_weight_name(layer))
    return names


def lowest_layer(adapter: ModelAdapter, param_names: Sequence[str]) -> int:
    """Index of the lowest decoder block holding one of ``param_names`` (below it, an edit of
    these weights changes nothing)."""
    if not param_names:
        raise ValueError("no parameter names given")
    return min(adapter.layer_of(name) for name in param_names)


@dataclass
class TokenGrads:
    """u and δ of every token of ``E`` edits, for each edited matrix (keyed by weight name).

    ``inputs[name]``: (E, T, d_in); ``grads[name]``: (E, T, d_out); ``mask``: (E, T) bool, true
    for the real tokens of each edit's row (padding is zero in both tensors).
    """

    inputs: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    mask: torch.Tensor

    @property
    def n_edits(self) -> int:
        return int(self.mask.shape[0])

    def weight_gradient(self, name: str, edits: Sequence[int] | None = None) -> torch.Tensor:
        """Σ_t δ_t u_tᵀ over the chosen edits' tokens: the (out, in) gradient of the edit loss."""
        idx = slice(None) if edits is None else list(edits)
        u, d = self.inputs[name][idx], self.grads[name][idx]
        return torch.einsum("eto,eti->oi", d, u)


@contextmanager
def record_io(model: nn.Module, param_names: Sequence[str]) -> Iterator[dict[str, Captured]]:
    """Record each named weight's module input (detached) and output (a differentiable node).

    A module whose output does not require grad yet (the lowest edited ones: nothing below them
    is trainable) gets its output turned into a leaf that does, so the graph starts there.
    """
    records = {name: Captured() for name in param_names}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            value = args[0] if args else next(iter(kwargs.values()))
            out = first_tensor(output)
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)
            records[name].input = first_tensor(value).detach()
            records[name].output = out
            return replace_first_tensor(output, out)

        return hook

    try:
        for name in param_names:
            module = model.get_submodule(module_of(name))
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield records
    finally:
        for handle in handles:
            handle.remove()


def token_grads(
    records: dict[str, Captured],
    loss: torch.Tensor,
    rows: Sequence[int],
    attention_mask: torch.Tensor,
) -> TokenGrads:
    """δ = ∂loss/∂output of each recorded module, with its inputs u, for the batch rows ``rows``
    (one per edit, in edit order). ``attention_mask`` is the batch's (B, S) mask."""
    names = list(records)
    outputs = [records[n].output for n in names]
    if any(o is None for o in outputs):
        missing = [n for n, o in zip(names, outputs) if o is None]
        raise RuntimeError(f"the forward pass never reached {missing}")
    grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    rows_t = torch.as_tensor(list(rows), device=attention_mask.device)
    mask = attention_mask[rows_t].bool()
    keep = mask.unsqueeze(-1)
    inputs_out, grads_out = {}, {}
    for name, out, grad in zip(names, outputs, grads):
        u = records[name].input[rows_t].float()
        d = torch.zeros_like(out[rows_t]) if grad is None else grad[rows_t]
        inputs_out[name] = u * keep
        grads_out[name] = d.detach().float() * keep
    return TokenGrads(inputs_out, grads_out, mask)


def pair_means(values: torch.Tensor, batch: TeacherForcedBatch) -> torch.Tensor:
    """Mean of per-token ``values`` (N,) over each pair's tokens: (n_pairs,)."""
    sums = torch.zeros(batch.n_pairs, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, batch.pair_index, values)
    counts = torch.bincount(batch.pair_index, minlength=batch.n_pairs).clamp(min=1)
    return sums / counts.to(values.dtype)


def scored_logprobs(lm: LoadedModel, batch: TeacherForcedBatch) -> torch.Tensor:
    """Full log-distributions (N, vocab) at every scored position of ``batch`` (differentiable)."""
    hidden = hidden_states(lm, batch.input_ids, batch.attention_mask)
    logits = lm.adapter.logits(hidden[batch.rows, batch.positions]).float()
    return torch.log_softmax(logits, dim=-1)


def edit_token_grads(
    lm: LoadedModel, requests: Sequence[EditRequest], param_names: Sequence[str]
) -> TokenGrads:
    """u and δ of the edit loss — the teacher-forced NLL of ``target_new`` after ``prompt``,
    averaged over each request's target tokens and summed over requests — one edit per request."""
    batch = build_batch(
        lm, [r.prompt for r in requests], [r.target_new for r in requests], share_prefixes=False
    )
    with torch.enable_grad(), record_io(lm.model, param_names) as records:
        logprobs = scored_logprobs(lm, batch)
        chosen = logprobs.gather(1, batch.token_ids[:, None]).squeeze(1)
        loss = -pair_means(chosen, batch).sum()
        return token_grads(records, loss, batch.rows_of_pairs, batch.attention_mask)
