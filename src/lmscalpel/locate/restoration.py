"""Corrupted runs with one clean state restored: the third run of causal tracing.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (Section 2.1): the corrupted
run, except that the clean value of one state (the residual stream after a layer, or the MLP or
attention outputs of a window of layers) is copied back at one token; the answer's probability,
averaged over the noise draws, measures that state's indirect effect.

Restoring at layer ``l`` cannot change the layers below it, so each restoration resumes the
corrupted forward pass at its first restored layer (:func:`lmscalpel.runtime.stream.run_layers`);
all restorations of one prompt run as one wavefront up the layers; with a cached prefix only the
tokens from the restored one on are recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Tap, replace_at_positions, tap
from lmscalpel.runtime.kv import new_cache
from lmscalpel.runtime.stream import (
    ResidualStream,
    check_replay,
    final_logits,
    record_stream,
    run_layers,
)

log = logging.getLogger(__name__)


def window_layers(center: int, window: int, num_layers: int) -> range:
    """The layers restored around ``center``: ``[center - window//2, center + ceil(window/2))``,
    clipped to the model (the paper's convention: a window of 1 is the layer itself)."""
    return range(max(0, center - window // 2), min(num_layers, center - (-window // 2)))


def module_names(lm: LoadedModel, kind: str) -> list[str]:
    """The ``kind`` (``mlp`` or ``attn``) module of every layer, bottom to top."""
    a = lm.adapter
    name = a.mlp_name if kind == "mlp" else a.attn_name
    return [name(layer) for layer in range(a.num_layers)]


@dataclass(frozen=True)
class Restoration:
    """One restoration: ``kind`` at ``token``, ``layer``; recomputed from layer ``start`` up,
    with the module outputs of the ``patched`` layers restored (mlp/attn)."""

    token: int
    layer: int
    start: int
    patched: range


class RestoredRuns:
    """The restored runs of one prompt, given its clean and corrupted runs.

    Restorations run as a *wavefront*: a batch is passed up the layers once, and each
    restoration's rows (one per noise draw) join it at its first recomputed layer, so every row
    runs exactly the layers above its restoration and every layer call is one large batch.

    A restoration at token ``t`` cannot change tokens before ``t``, so the restorations of one
    token recompute only tokens ``t..``, reading the corrupted run's keys and values of the tokens
    before ``t``. Should that not reproduce the model's forward pass (checked once per token), or
    the cache not hold every position, those restorations recompute the whole sequence instead.
    """

    def __init__(
        self,
        lm: LoadedModel,
        kind: str,
        input_ids: torch.Tensor,
        clean: ResidualStream,
        clean_out: dict,
        corrupted: ResidualStream,
        answer_token: int,
        batch_tokens: int,
        replay_tolerance: float,
    ) -> None:
        self.lm = lm
        self.replay_tolerance = replay_tolerance
        self.kind = kind
        self.input_ids = input_ids
        self.clean = clean
        self.clean_out = clean_out
        self.corrupted = corrupted
        self.answer_token = answer_token
        self.batch_tokens = batch_tokens
        self.samples = corrupted.states[0].shape[0]
        self.names = module_names(lm, kind) if kind != "hidden" else []

    def restoration(self, token: int, layer: int, window: int) -> Restoration:
        if self.kind == "hidden":  # the state after `layer` is the input of layer + 1
            return Restoration(token, layer, layer + 1, range(0))
        patched = window_layers(layer, window, self.lm.adapter.num_layers)
        return Restoration(token, layer, patched.start, patched)

    def suffix(self, token: int) -> ResidualStream | None:
        """The clean stream of tokens ``token..`` after the cached prefix, or ``None`` to
        recompute the whole sequence."""
        if token == 0 or self.clean.kv is None or self.corrupted.kv is None:
            return None
        prefix = [(k[:, :, :token], v[:, :, :token]) for k, v in self.clean.kv]
        try:
            stream = record_stream(self.lm, self.input_ids[:, token:], past=prefix)
            check_replay(
                self.lm, stream, past=new_cache(self.lm, prefix), atol=self.replay_tolerance
            )
        except (RuntimeError, ValueError) as error:
            log.debug("recomputing whole sequences for token %d: %s", token, error)
            return None
        return stream

    def run(
        self, restorations: Sequence[Restoration], suffix: ResidualStream | None
    ) -> list[float]:
        """Mean P(answer) over the noise draws for each restoration, in order. With ``suffix``,
        all restorations are at the token where it starts."""
        offset = restorations[0].token if suffix is not None else 0
        width = self.input_ids.shape[1] - offset
        per_chunk = max(1, self.batch_tokens // (self.samples * width))
        order = sorted(range(len(restorations)), key=lambda i: restorations[i].start)
        probs = [0.0] * len(restorations)
        for lo in range(0, len(order), per_chunk):
            chunk = [restorations[i] for i in order[lo : lo + per_chunk]]
            for i, p in zip(order[lo : lo + per_chunk], self._wavefront(chunk, suffix, offset)):
                probs[i] = p
        return probs

    def _wavefront(
        self, group: list[Restoration], suffix: ResidualStream | None, offset: int
    ) -> list[float]:
        lm, n = self.lm, self.samples
        n_layers = lm.adapter.num_layers
        stream = self.clean if suffix is None else suffix
        hidden: torch.Tensor | None = None  # (samples, active restorations, width, d)
        active: list[Restoration] = []
        for layer in range(group[0].start, n_layers + 1):
            joining = [r for r in group if r.start == layer]
            if joining:
                hidden = self._join(hidden, joining, offset)
                active += joining
            if layer == n_layers:
                break
            g = len(active)
            taps = {}
            restored_here = [i for i, r in enumerate(active) if layer in r.patched]
            if restored_here:
                name = self.names[layer]
                tokens = [active[i].token for i in restored_here]
                values = self.clean_out[name].output[0, tokens].repeat(n, 1)
                rows = [s * g + i for s in range(n) for i in restored_here]
                positions = [t - offset for t in tokens] * n
                taps[name] = Tap(replace=replace_at_positions(values, positions, rows))
            past = None
            if suffix is not None:
                keys, vals = self.corrupted.kv[layer]
                prefix = [x[:, None, :, :offset].expand(-1, g, -1, -1, -1) for x in (keys, vals)]
                past = new_cache(lm, {layer: tuple(x.reshape(n * g, *x.shape[2:]) for x in prefix)})
            rows_in = hidden.reshape(n * g, *hidden.shape[2:])
            with tap(lm.model, taps):
                out = run_layers(lm, stream, rows_in, layer, layer + 1, past=past)
            hidden = out.view(n, g, *out.shape[1:])
        logits = final_logits(lm, hidden[:, :, -1]).float()  # (samples, restorations, vocab)
        mean = torch.softmax(logits, dim=-1)[..., self.answer_token].mean(dim=0)
        by_restoration = dict(zip(active, mean.tolist()))
        return [by_restoration[r] for r in group]

    def _join(
        self, hidden: torch.Tensor | None, joining: list[Restoration], offset: int
    ) -> torch.Tensor:
        """``hidden`` with the rows of restorations that start at this layer appended."""
        layer = joining[0].start
        base = self.corrupted.states[layer][:, offset:]  # (samples, width, d)
        new = base[:, None].repeat(1, len(joining), 1, 1)
        if self.kind == "hidden":
            for i, r in enumerate(joining):
                new[:, i, r.token - offset] = self.clean.states[layer][0, r.token]
        return new if hidden is None else torch.cat([hidden, new], dim=1)
