"""Keys and values: the shared mechanics of the locate-then-edit methods (ROME, MEMIT, AlphaEdit).

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", §3.1) treat an MLP output
matrix W as a key-value memory: its input at the subject's last token is the *key* k that selects
the fact, its output the *value* v that recalls it. Editing a fact takes

* the key k*: the key at the subject's last token, averaged over the prompt behind a few context
  prefixes (:func:`compute_keys`; :func:`anchor_states` reads any modules' inputs and outputs
  there, e.g. MEMIT's keys at one layer and hidden states at another, in one pass), and
* a new value: a vector δ added to a module's output at that position and optimised so that the
  new target becomes likely behind every prefix, while a KL term keeps what the model says about
  the subject itself ("{subject} is a") and the norm of δ stays bounded (:func:`optimise_values`:
  ROME's v* = W k* + δ at an MLP output; MEMIT's target hidden state z = h + δ at a block output).

Both run on :class:`~lmscalpel.mechanics.anchored.AnchoredBatch` rows (all anchors in one column).
:func:`optimise_values` optimises the δ of many requests together: all their prompts behind every
prefix form one batch whose optimisation reruns only the positions and layers δ can affect
(:class:`AnchoredRun`), reads logits only where the loss needs them, and stops *per request* as
soon as its target is likely enough (a finished request leaves the batch, the others go on). Each
request's loss depends on its own δ only, and each δ has its own Adam state, so a request gets the
same δ whether it is optimised alone or with others (to float precision; the tests check it).
A loss or δ that stops being finite raises :class:`DivergedError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmscalpel.core.config import MethodConfig, option
from lmscalpel.core.requests import EditRequest
from lmscalpel.mechanics.anchored import AnchoredBatch, AnchoredRow, AnchoredRun
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.kv import run_body
from lmscalpel.runtime.layers import from_layer
from lmscalpel.runtime.memory import release_freed_memory

log = logging.getLogger(__name__)

KeySolver = Callable[[torch.Tensor], torch.Tensor]
"""k ↦ C⁻¹k for keys (d_k,): e.g. :meth:`lmscalpel.mechanics.stats.KeyStatistics.solve`."""

STATE_BATCH = 64
"""Requests whose anchor states :func:`anchor_states` reads in one forward pass."""


class DivergedError(RuntimeError):
    """A value optimisation produced a loss or a δ that is not finite (NaN or infinite).

    ``request_index`` is the request's position in the list given to :func:`optimise_values`,
    ``step`` the optimisation step (0: before any update, i.e. the model itself gives a
    non-finite loss)."""

    def __init__(self, request_index: int, step: int, what: str, subject: str = "") -> None:
        self.request_index, self.step = request_index, step
        about = f" (subject {subject!r})" if subject else ""
        super().__init__(
            f"value optimisation diverged for request {request_index}{about} at step {step}: "
            f"{what} is not finite; lower lr or clamp_norm, or check the model's weights"
        )


def context_rows(
    request: EditRequest, prefixes: Sequence[str], *, with_target: bool = True
) -> list[AnchoredRow]:
    """The request's prompt behind each prefix, with its new target (unless ``with_target=False``)."""
    target = request.target_new if with_target else None
    return [
        AnchoredRow(prefix + request.prompt, request.subject, target, subject_from=len(prefix))
        for prefix in prefixes
    ]


class AnchorStates:
    """Passes without gradients over N requests' prompts behind every prefix that read module
    inputs and outputs at each subject's last token, averaged over the prefixes — repeatedly, as
    MEMIT reads each layer's keys after updating the layers below.

    The rows are tokenised once, in batches of ``batch_size`` requests. ``read(..., keep=l)``
    also keeps the input of layer ``l`` (every column); a later ``read(..., resume=True)`` starts
    from it (:func:`~lmscalpel.runtime.layers.from_layer`) and skips the layers below — valid as
    long as no weight below layer ``l`` changed in between (MEMIT updates layers from the lowest
    up, so the input of the layer it has just updated is still the input of that layer).
    """

    def __init__(
        self,
        lm: LoadedModel,
        requests: Sequence[EditRequest],
        prefixes: Sequence[str],
        batch_size: int = STATE_BATCH,
    ) -> None:
        self.lm, self.prefixes = lm, list(prefixes)
        self.batches: list[tuple[int, AnchoredBatch]] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            rows = [row for r in chunk for row in context_rows(r, prefixes, with_target=False)]
            # what is read at the anchors depends on no later column (causal attention): the
            # rows end there
            self.batches.append((len(chunk), AnchoredBatch.build(lm, rows).through_anchor()))
        self._kept: tuple[int, list[torch.Tensor]] | None = None

    def read(
        self,
        inputs: Sequence[str] = (),
        outputs: Sequence[str] = (),
        *,
        keep: int | None = None,
        resume: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``({name: (N, d)}, {name: (N, d)})``: the inputs of the modules ``inputs`` and the outputs
        of the modules ``outputs``, at the subjects' last tokens, averaged over the prefixes.
        ``keep``: also keep layer ``keep``'s input for a later ``resume`` (see the class)."""
        names = list(dict.fromkeys([*inputs, *outputs]))
        if not names:
            raise ValueError("AnchorStates.read needs a module to read")
        if resume and self._kept is None:
            raise ValueError("nothing was kept to resume from: read with keep= first")
        taps = {n: Tap(input=n in inputs, output=n in outputs) for n in names}
        kept_name = None if keep is None else self.lm.adapter.layer_name(keep)
        if kept_name is not None:
            taps[kept_name] = Tap(input=True, output=kept_name in outputs)
        found_in: dict[str, list[torch.Tensor]] = {n: [] for n in inputs}
        found_out: dict[str, list[torch.Tensor]] = {n: [] for n in outputs}
        kept: list[torch.Tensor] = []
        layer, sources = (self._kept[0], list(self._kept[1])) if resume else (None, [])
        if keep is not None:  # replaced by what this read keeps; the old inputs go batch by batch
            self._kept = None
        for index, (count, batch) in enumerate(self.batches):
            with torch.no_grad(), tap(self.lm.model, taps, stop=True) as seen:
                if resume:
                    hidden, sources[index] = sources[index], None
                    with from_layer(self.lm, layer, hidden):
                        run_body(self.lm, batch.input_ids, batch.attention_mask, batch.position_ids)
                    del hidden
                else:
                    run_body(self.lm, batch.input_ids, batch.attention_mask, batch.position_ids)
            for name, parts in found_in.items():
                state = seen[name].input[:, batch.anchor]
                parts.append(state.reshape(count, len(self.prefixes), -1).mean(dim=1))
            for name, parts in found_out.items():
                state = seen[name].output[:, batch.anchor]
                parts.append(state.reshape(count, len(self.prefixes), -1).mean(dim=1))
            if kept_name is not None:
                kept.append(seen[kept_name].input)
        if keep is not None:
            self._kept = (keep, kept)
        release_freed_memory()  # the passes' activations (and the layer inputs kept before)
        return (
            {n: torch.cat(parts) for n, parts in found_in.items()},
            {n: torch.cat(parts) for n, parts in found_out.items()},
        )


def anchor_states(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    *,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
    batch_size: int = STATE_BATCH,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inputs of the modules ``inputs`` and the outputs of the modules ``outputs`` at each
    subject's last token, averaged over the prompt behind every prefix: ``({name: (N, d)},
    {name: (N, d)})`` for N requests. Passes without gradients of ``batch_size`` requests each,
    stopped after the highest tapped module (one :meth:`AnchorStates.read`).
    """
    return AnchorStates(lm, requests, prefixes, batch_size).read(inputs, outputs)


def compute_keys(
    lm: LoadedModel, layer: int, requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> torch.Tensor:
    """k* (n_requests, d_k): the input of layer ``layer``'s MLP output matrix at each subject's last
    token, averaged over the prompt behind every prefix (:func:`anchor_states`).
    """
    name = lm.adapter.mlp_out_name(layer)
    return anchor_states(lm, requests, prefixes, inputs=[name])[0][name]


@dataclass
class ValueOptions(MethodConfig):
    """How δ is optimised (the defaults are ROME's, with early stopping; docs/rome.md measures
    them). A method that optimises values (ROME, MEMIT, AlphaEdit) *is* these options plus its own
    fields: its config class derives from this one, so the fields exist once.

    ``lr`` is in units of the unedited value's norm ‖v‖ (:func:`value_scale`) per √d, so one
    value suits models of any width and scale; Adam's β = (0.5, 0.9) (short memory) reaches the
    target in fewer steps than the default β here.
    """

    lr: float = option(
        0.5,
        "Adam's step size for δ, in units of the unedited value's norm per √d",
        above=0,
        at_most=1e3,
    )
    max_steps: int = option(
        20, "at most this many optimisation steps for δ", at_least=1, at_most=100_000
    )
    stop_nll: float = option(
        0.5,
        "stop once the mean negative log-likelihood of the new target is at most this",
        at_least=0,
    )
    kl_factor: float = option(
        0.0625,
        "weight of KL(new ‖ old) of the next-token distribution after kl_prompt",
        at_least=0,
        at_most=1e6,
    )
    kl_prompt: str = option(
        "{} is a",
        "prompt whose prediction must not change; {} is the subject",
        placeholders=("{}",),
    )
    weight_decay: float = option(0.5, "weight of (‖δ‖ / ‖v‖)² in the loss", at_least=0, at_most=1e6)
    clamp_norm: float = option(
        4.0, "after every step ‖δ‖ is clipped to clamp_norm · ‖v‖", above=0, at_most=1e6
    )
    fast: bool = option(
        True,
        "rerun only the positions and layers δ can change (False: the whole model, a reference)",
    )


@dataclass
class ValueResult:
    """What :func:`optimise_values` found for one request.

    ``delta`` (d,): the vector to add to the module's output at the subject's last token.
    ``keys`` (n_prefixes, d_k): the MLP-output-matrix input there behind each prefix; ``key`` their
    mean k*. ``outputs`` (n_prefixes, d): the module's unedited output there behind each prefix;
    ``output`` their mean (MEMIT's target hidden state is ``output + delta``). ``value_norm``:
    ‖v‖ of the unedited output on the first prompt (the bare one) unless its subject is its first
    token; then on the first prefixed prompt (:func:`value_scale`). ``nll``: the mean target
    negative log-likelihood before each step (and after the last); ``kl`` likewise.
    """

    delta: torch.Tensor
    keys: torch.Tensor
    value_norm: float
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    outputs: torch.Tensor | None = None

    @property
    def key(self) -> torch.Tensor:
        return self.keys.mean(dim=0)

    @property
    def output(self) -> torch.Tensor:
        if self.outputs is None:
            raise ValueError("this value result kept no module outputs")
        return self.outputs.mean(dim=0)

    @property
    def steps(self) -> int:
        return len(self.nll) - 1


def value_scale(outputs: torch.Tensor, positions: torch.Tensor) -> float:
    """‖v‖, the norm that ``lr``, ``weight_decay`` and ``clamp_norm`` are in units of: the
    unedited output at the anchor of the first of a request's rows (``outputs`` (P, d), in
    prompt order, the bare prompt first) whose anchor is not its sequence's first position
    (``positions`` (P,)); the first row's if every anchor is.

    The first position of a causal LM's sequence is its attention sink and carries a massive
    activation in the residual stream of the middle and upper layers (SmolLM2-135M at layer 11:
    ‖h‖ = 23,977 where other positions have about 155). A subject that is a prompt's first token
    would otherwise have its δ scaled, and clipped, by that norm and break a MEMIT batch
    (docs/memit.md, "A subject at the first token").
    """
    inside = torch.nonzero(positions != 0).flatten()
    row = int(inside[0]) if len(inside) else 0
    return float(outputs[row].norm())


def injection_scales(
    run: AnchoredRun,
    key_module: str,
    rows: int,
    key_solver: KeySolver | None,
    *,
    groups: int = 1,
) -> torch.Tensor:
    """How much of δ each recomputed position receives, (B, T) like the hooked tensors.

    The batch holds ``groups`` requests, each a block of B / ``groups`` consecutive rows whose
    first ``rows`` are its prefixed prompts. Without a ``key_solver``: 1 at every row's anchor, 0
    elsewhere (the paper's approximation). With one (k ↦ C⁻¹k): (C⁻¹k*)ᵀk_p / (C⁻¹k*)ᵀk* at
    every recomputed position p of a block — exactly what the rank-one update W' = W + δ
    (C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀk*) adds there, k* being the mean key of the block's first ``rows`` rows
    at the anchor (the very key the update is then built from: see docs/rome.md, r-ROME).
    """
    captured = run.captured[key_module].input  # (B, T, d_k)
    a = run.anchor_index
    if key_solver is None:
        scales = torch.zeros(captured.shape[:2], dtype=captured.dtype, device=captured.device)
        scales[:, a] = 1.0
        return scales
    block = captured.shape[0] // groups
    parts = []
    for g in range(groups):
        span = captured[g * block : (g + 1) * block]
        key = span[:rows, a].mean(dim=0).double()  # = ValueResult.key, the update's key
        direction = key_solver(key).to(captured.device).double()
        parts.append((span.double() @ direction) / (direction @ key))
    scales = parts[0] if groups == 1 else torch.cat(parts)
    scales[:, :a] = 0.0  # positions before the anchors are not recomputed (see docs/rome.md)
    scales = scales * run.batch.attention_mask[:, run.batch.anchor - a :].to(scales.dtype)
    return scales.to(captured.dtype)


def optimise_values(
    lm: LoadedModel,
    layer: int,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    options: ValueOptions | None = None,
    *,
    module: str | None = None,
    key_solver: KeySolver | None = None,
    batch_size: int | None = None,
) -> list[ValueResult]:
    """For each request, the δ such that adding it to ``module``'s output (default: layer
    ``layer``'s MLP output matrix, as in ROME; MEMIT passes a block's name) at the subject's last
    token makes ``request.target_new`` likely behind every prefix (Meng et al. 2022, eq. 4;
    Meng et al. 2023, eq. 16). ``module`` must be at layer ``layer`` or above; the keys are read
    at layer ``layer``'s MLP output matrix.

    ``batch_size`` requests (default: all) are optimised together in one anchored batch (see the
    module docstring; with several batches, requests of similar lengths share one); each request
    stops on its own. With ``key_solver`` (k ↦ C⁻¹k), δ is
    injected as the rank-one update of layer ``layer``'s MLP output matrix will add it — scaled
    per position, see :func:`injection_scales` — so what is optimised is what the edit does.
    The model is not changed; gradients flow only into the δ. A non-finite loss or δ raises
    :class:`DivergedError` naming the request (its index in ``requests``) and the step.
    """
    options = options or ValueOptions()
    requests = list(requests)
    size = batch_size or max(1, len(requests))
    order = list(range(len(requests)))
    if len(requests) > size:  # batches of similar lengths carry less padding
        order.sort(key=lambda i: _suffix_length(requests[i]))
    results: list[ValueResult | None] = [None] * len(requests)
    for start in range(0, len(requests), size):
        indices = order[start : start + size]
        chunk = [requests[i] for i in indices]
        found = _optimise_batch(lm, layer, chunk, prefixes, options, module, key_solver, indices)
        for i, result in zip(indices, found):
            results[i] = result
        release_freed_memory()  # the batch's activations, before the next one allocates its own
    return results  # type: ignore[return-value]


def _suffix_length(request: EditRequest) -> int:
    """About how many characters a request's rows hold after the subject (what a batch pads)."""
    end = request.prompt.rfind(request.subject) + len(request.subject)
    return len(request.prompt) - end + len(request.target_new)


def optimise_value(
    lm: LoadedModel,
    layer: int,
    request: EditRequest,
    prefixes: Sequence[str],
    options: ValueOptions | None = None,
    *,
    module: str | None = None,
    key_solver: KeySolver | None = None,
) -> ValueResult:
    """:func:`optimise_values` for one request (ROME's N = 1)."""
    solutions = optimise_values(
        lm, layer, [request], prefixes, options, module=module, key_solver=key_solver
    )
    return solutions[0]


@dataclass
class _Bucket:
    """Rows of an anchored run with (about) the same number of suffix columns, run together:
    ``rows`` their indices in the whole batch, ``run`` the run restricted to them (and cut after
    their last column), ``scales`` their injection scales; ``kl_rows`` which of them (local
    indices) are KL prompts and ``kl_requests`` whose."""

    rows: torch.Tensor
    run: AnchoredRun
    scales: torch.Tensor
    kl_rows: torch.Tensor
    kl_requests: torch.Tensor


BUCKET_ROWS = 8
"""A group of rows of one suffix length smaller than this joins the next longer group."""


def _buckets(
    run: AnchoredRun, scales: torch.Tensor, active: Sequence[int], block: int
) -> list[_Bucket]:
    """The rows of the ``active`` requests grouped by suffix length, so that short rows (the KL
    prompts, short prompts) are not padded to the longest: about half the columns of a batch of
    CounterFact requests are padding otherwise. A lone request runs whole, as it is."""
    device = scales.device
    rows = _block_rows(active, block, device)
    if len(active) == 1 and len(rows) == run.batch.input_ids.shape[0]:
        kl = torch.tensor([block - 1], device=device)
        return [_Bucket(rows, run, scales, kl, torch.tensor(active, device=device))]
    lengths = run.batch.last_cols[rows] - run.batch.anchor + 1
    order = torch.argsort(lengths, stable=True)
    rows, lengths = rows[order], lengths[order]
    groups, start = [], 0
    values = lengths.tolist()
    for end in range(1, len(values) + 1):
        if end == len(values) or (values[end] != values[end - 1] and end - start >= BUCKET_ROWS):
            groups.append(rows[start:end])
            start = end
    buckets = []
    for group in groups:
        picked = run.select(group)
        columns = picked.batch.width - (picked.batch.anchor if picked.fast else 0)
        kl = torch.nonzero(group % block == block - 1).squeeze(1)
        buckets.append(_Bucket(group, picked, scales[group, :columns], kl, group[kl] // block))
    return buckets


def _block_rows(requests: Sequence[int], block: int, device: torch.device) -> torch.Tensor:
    """The batch rows of the given requests, each a block of ``block`` consecutive rows."""
    starts = torch.tensor(list(requests), dtype=torch.long, device=device) * block
    return (starts[:, None] + torch.arange(block, device=device)).reshape(-1)


def _optimise_batch(
    lm: LoadedModel,
    layer: int,
    requests: Sequence[EditRequest],
    prefixes: Sequence[str],
    options: ValueOptions,
    module: str | None,
    key_solver: KeySolver | None,
    indices: Sequence[int],
) -> list[ValueResult]:
    """:func:`optimise_values` for one batch. Request ``i`` owns rows ``i·(P+1) .. i·(P+1)+P``:
    its prompt behind the P prefixes, then its KL prompt."""
    key_module = lm.adapter.mlp_out_name(layer)
    module = module or key_module
    n, p = len(requests), len(prefixes)
    block = p + 1
    rows: list[AnchoredRow] = []
    for request in requests:
        rows += context_rows(request, prefixes)
        rows.append(AnchoredRow(options.kl_prompt.format(request.subject), request.subject))
    batch = AnchoredBatch.build(lm, rows)
    run = AnchoredRun(lm, batch, layer, captures=sorted({key_module, module}), fast=options.fast)

    a = run.anchor_index
    key_inputs, outputs = run.captured[key_module].input, run.captured[module].output
    all_scales = injection_scales(run, key_module, p, key_solver, groups=n)
    dim = outputs.shape[-1]
    results, deltas, norms, groups = [], [], [], []
    compute_dtype = torch.promote_types(lm.dtype, torch.float32)
    for i in range(n):
        first = i * block
        value_norm = value_scale(
            outputs[first : first + p, a], batch.position_ids[first : first + p, batch.anchor]
        )
        norms.append(max(value_norm, 1e-6))
        # δ, its Adam state and the loss in float32 or better whatever the model's dtype (a
        # float16 δ overflows in Adam's first step); it is cast where it enters the hidden state
        delta = torch.zeros(dim, dtype=compute_dtype, device=lm.device, requires_grad=True)
        deltas.append(delta)
        groups.append({"params": [delta], "lr": options.lr * norms[-1] / dim**0.5})
        keys = key_inputs[first : first + p, a].clone()
        found = outputs[first : first + p, a].clone()
        results.append(ValueResult(delta=delta, keys=keys, value_norm=value_norm, outputs=found))
    optimizer = torch.optim.Adam(groups, betas=(0.5, 0.9))  # one Adam state per request

    device = all_scales.device
    row_request = torch.arange(n, device=device).repeat_interleave(block)
    counts = torch.bincount(batch.read_rows, minlength=n * block).clamp(min=1).float()
    active = list(range(n))
    buckets = _buckets(run, all_scales, active, block)
    reference: torch.Tensor | None = None  # the unedited distributions after the KL prompts
    for step in range(options.max_steps + 1):
        stacked = deltas[0][None, :] if n == 1 else torch.stack(deltas)  # one δ: broadcast it
        per_row = torch.zeros(n * block, device=device)
        kl_parts = []
        for bucket in buckets:
            rows = stacked if n == 1 else stacked[row_request[bucket.rows]]

            def inject(
                hidden: torch.Tensor, rows: torch.Tensor = rows, factors=bucket.scales
            ) -> torch.Tensor:
                change = factors[..., None].to(hidden.dtype) * rows[:, None, :].to(hidden.dtype)
                return hidden + change

            hidden = bucket.run.suffix_hidden({module: inject})
            reads = bucket.run.batch
            logits = bucket.run.logits(hidden, reads.read_rows, reads.read_cols)
            logprobs = torch.log_softmax(logits.to(compute_dtype), dim=-1)
            chosen = logprobs.gather(1, reads.read_tokens[:, None]).squeeze(1)
            per_row = per_row.index_add(0, bucket.rows[reads.read_rows], chosen)
            if len(bucket.kl_rows):
                kl_logits = bucket.run.logits(
                    hidden, bucket.kl_rows, reads.last_cols[bucket.kl_rows]
                )
                kl_parts.append(
                    (bucket.kl_requests, torch.log_softmax(kl_logits.to(compute_dtype), dim=-1))
                )
        if reference is None:
            reference = torch.zeros(n, kl_parts[0][1].shape[-1], device=device)
            for owners, kl_logprobs in kl_parts:
                reference[owners] = kl_logprobs.detach()
        kl_all = torch.zeros(n, device=device)
        for owners, kl_logprobs in kl_parts:
            divergence = (kl_logprobs.exp() * (kl_logprobs - reference[owners])).sum(dim=-1)
            kl_all = kl_all.index_put((owners,), divergence)
        chosen_requests = torch.tensor(active, device=device)
        nll = (-(per_row / counts).reshape(n, block)[:, :p].mean(dim=1))[chosen_requests]
        kl = kl_all[chosen_requests]
        decay = torch.stack([(deltas[i].norm() / norms[i]) ** 2 for i in active])
        losses = nll + options.kl_factor * kl + options.weight_decay * decay

        going, nll_values = [], nll.tolist()
        for j, (i, nll_j, kl_j) in enumerate(zip(active, nll_values, kl.tolist())):
            if not (math.isfinite(nll_j) and math.isfinite(kl_j)):
                raise DivergedError(indices[i], step, "the loss", requests[i].subject)
            results[i].nll.append(nll_j)
            results[i].kl.append(kl_j)
            if nll_j > options.stop_nll and step < options.max_steps:
                going.append(j)
        log.debug(
            "value step %d: %d of %d requests still optimising, mean nll %.4f",
            step, len(going), n, sum(nll_values) / len(nll_values),
        )  # fmt: skip
        if not going:
            break
        optimizer.zero_grad(set_to_none=True)
        losses[torch.tensor(going, device=losses.device)].sum().backward()
        stepping = [active[j] for j in going]
        for i in set(range(n)) - set(stepping):  # finished: Adam must not move it again
            deltas[i].grad = None
        optimizer.step()
        with torch.no_grad():
            for i in stepping:
                limit = options.clamp_norm * norms[i]
                norm = deltas[i].norm()
                if norm > limit:
                    deltas[i].mul_(limit / norm)
                if not bool(torch.isfinite(deltas[i]).all()):
                    raise DivergedError(indices[i], step, "δ", requests[i].subject)
        if len(stepping) < len(active):  # the finished requests leave the batch
            buckets = _buckets(run, all_scales, stepping, block)
        active = stepping
    for result, delta in zip(results, deltas):
        result.delta = delta.detach().clone()
    return results
