"""The raw material of a MEND edit: each token's layer input u and output gradient δ.

A linear layer y = W u (+ b) applied at every token t of a batch has the weight gradient

    ∇_W L = Σ_t δ_t u_tᵀ,    δ_t = ∂L/∂y_t,

a sum of rank-one outer products (Mitchell et al. 2022, "Fast Model Editing at Scale", §3.1). MEND
transforms the pairs (u_t, δ_t) — d_in + d_out numbers per token — instead of the d_out x d_in
gradient. This module records them for the edited matrices with one
:func:`lmscalpel.runtime.hooks.tap`: it keeps each module's input u, and the module's output is
made a differentiable node whose gradient :func:`torch.autograd.grad` returns as δ. Only the
layers from the lowest edited matrix upwards take part in the backward pass; the base model's
parameters never require grad.

Shapes are in the adapter's (out, in) convention whatever the storage (GPT-2's ``Conv1D`` stores
(in, out); see :meth:`ModelAdapter.to_storage`), because u and δ are read at the module's input and
output, not from its weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lmscalpel.core.config import ConfigError
from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.base import resolve_layers
from lmscalpel.models.adapter import ModelAdapter, module_of
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Seen, Tap, tap
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


def io_taps(param_names: Sequence[str]) -> dict[str, Tap]:
    """The taps that give each named weight's module input u and output δ node.

    Keyed by module name (see :func:`lmscalpel.models.adapter.module_of`). A module whose output
    does not require grad yet (the lowest edited ones: nothing below them is trainable) gets its
    output turned into a leaf that does, so the graph starts there.
    """
    return {module_of(name): Tap(input=True, output=True, grad=True) for name in param_names}


def token_grads(
    seen: Mapping[str, Seen],
    param_names: Sequence[str],
    loss: torch.Tensor,
    rows: Sequence[int],
    attention_mask: torch.Tensor,
) -> TokenGrads:
    """δ = ∂loss/∂output of each weight's module, with its inputs u, for the batch rows ``rows``
    (one per edit, in edit order). ``seen``: what :func:`io_taps` kept; ``attention_mask`` is the
    batch's (B, S) mask."""
    names = list(param_names)
    records = [seen[module_of(n)] for n in names]
    outputs = [r.output for r in records]
    if any(o is None for o in outputs):
        missing = [n for n, o in zip(names, outputs) if o is None]
        raise RuntimeError(f"the forward pass never reached {missing}")
    grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    rows_t = torch.as_tensor(list(rows), device=attention_mask.device)
    mask = attention_mask[rows_t].bool()
    keep = mask.unsqueeze(-1)
    inputs_out, grads_out = {}, {}
    for name, record, out, grad in zip(names, records, outputs, grads):
        u = record.input.detach()[rows_t].float()
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
    with torch.enable_grad(), tap(lm.model, io_taps(param_names)) as seen:
        logprobs = scored_logprobs(lm, batch)
        chosen = logprobs.gather(1, batch.token_ids[:, None]).squeeze(1)
        loss = -pair_means(chosen, batch).sum()
        return token_grads(seen, param_names, loss, batch.rows_of_pairs, batch.attention_mask)
