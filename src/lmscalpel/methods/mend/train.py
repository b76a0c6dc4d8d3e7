"""Meta-training a MEND editor on edit records.

Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1. Each training step takes a batch
of edits; for each edit e:

1. the base model (frozen) runs on the edit prompt, and the teacher-forced NLL of ``target_new``
   gives every edited matrix's per-token (u, δ) (:mod:`.grads`);
2. the editor turns them into ΔW_e (:mod:`.network`);
3. the edited model — every row seeing its own edit's ΔW, applied through hooks, the base weights
   untouched (:mod:`.edited`) — is scored on the edit prompt and its paraphrase (generalization:
   NLL of ``target_new``) and on an unrelated prompt (locality: KL(original ‖ edited) of the full
   next-token distributions at its answer's positions);
4. the editor's parameters take an Adam step on
   ``edit_weight x NLL + loc_weight x KL``.

Only the blocks from the lowest edited one upwards differ between the passes, so each record's
pass through the blocks below is made once and kept (:class:`LowerCache`): the first epoch over
the training records costs about one forward pass per prompt, later ones a tenth of that (with
the default three top layers of a 30-layer model).

Before training, the standardisation statistics of (u, δ) are measured on training edits and
the initial step size η is chosen by a line search on the same objective, so the untrained
editor is already a sensible gradient step. A held-out validation slice is scored before
training and every ``val_every`` steps with CounterFact's comparisons, as the benchmark scores
them: edit success (ES: after the edit prompt the new target is more likely than the true one,
by mean per-token log-probability; exact argmax match for records without a true target),
paraphrase success (PS, the same after the paraphrase) and neighbourhood success (NS: the
locality prompt still prefers its answer to the new target), plus the locality drawdown (DD: the
share of locality tokens whose argmax changed). The best state by the harmonic mean of ES, PS
and NS (CounterFact's score) is kept; training stops after ``steps``, after ``patience``
validations without improvement, or when ``max_minutes`` of wall time are spent.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lmscalpel.core.config import ConfigError, MethodConfig
from lmscalpel.core.requests import EditRequest
from lmscalpel.mechanics.stats import DEFAULT_CORPUS, DEFAULT_SAMPLES, input_statistics
from lmscalpel.methods.mend.edited import edited_forward
from lmscalpel.methods.mend.grads import (
    TokenGrads,
    edited_parameter_names,
    lowest_layer,
    pair_means,
    record_io,
    scored_logprobs,
    token_grads,
)
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import capture, resume_at
from lmscalpel.scoring import TeacherForcedBatch, build_batch, hidden_states
from lmscalpel.tokens import encode_target

log = logging.getLogger(__name__)

EDIT, PARAPHRASE, LOCALITY = 0, 1, 2  # the pairs the meta-loss trains on
# score-only pairs for CounterFact's comparisons at validation: the true target after the edit
# prompt and the paraphrase, the new target after the locality prompt
EDIT_TRUE, PARAPHRASE_TRUE, LOCALITY_NEW = 3, 4, 5
CONTRAST = {EDIT: EDIT_TRUE, PARAPHRASE: PARAPHRASE_TRUE, LOCALITY: LOCALITY_NEW}


@dataclass
class MENDTrainConfig(MethodConfig):
    """Meta-training hyperparameters (and the shape of the editor they build).

    ``layers`` (negative counts from the top) and ``matrices`` (``"mlp"``: every MLP matrix,
    ``"mlp_out"``: the output one) choose the edited weights; ``rank`` is the width of each
    transform's hidden layer. ``lr`` trains the transforms, ``step_lr`` the log step sizes.
    ``edit_weight`` and ``loc_weight`` weigh the edit/paraphrase NLL against the locality KL
    (the paper's c_edit = 0.1 and c_loc = 1).
    ``val_size`` records are held out; ``calibration_edits`` training edits set the input
    statistics and the initial step size. ``max_train`` caps the training records used: each
    record's pass through the unedited blocks below the edit is made once and kept (see
    :class:`LowerCache`), so later epochs over the same records cost a fraction of the first.
    """

    layers: list[int] = (-3, -2, -1)
    matrices: Literal["mlp", "mlp_out"] = "mlp"
    rank: int = 256
    steps: int = 2000
    batch_size: int = 8
    lr: float = 1e-4
    step_lr: float = 1e-2
    edit_weight: float = 0.1
    loc_weight: float = 1.0
    grad_clip: float = 1.0
    val_size: int = 96
    val_every: int = 50
    patience: int = 6
    max_minutes: float | None = 25.0
    calibration_edits: int = 64
    max_train: int | None = 2000
    step_scales: tuple[float, ...] = (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
    precondition: bool = True
    ridge: float = 1e-3
    stats_corpus: str = DEFAULT_CORPUS
    stats_samples: int = DEFAULT_SAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers:
            raise ConfigError("MENDTrainConfig.layers is empty: name at least one layer to edit")
        for key in ("rank", "batch_size", "val_every", "patience", "calibration_edits"):
            if getattr(self, key) < 1:
                raise ConfigError(f"MENDTrainConfig.{key} must be at least 1")
        if any(scale <= 0 for scale in self.step_scales):
            raise ConfigError("MENDTrainConfig.step_scales must be positive")
        if self.steps < 0 or self.val_size < 1:
            raise ConfigError("MENDTrainConfig: steps must be >= 0 and val_size >= 1")


# ---- one meta-batch ---------------------------------------------------------------------------
@dataclass
class MetaBatch:
    """The edit, paraphrase and locality prompts of several edits in one teacher-forced batch.

    ``role[p]``: EDIT, PARAPHRASE or LOCALITY for pair ``p`` (or a score-only contrast role);
    ``owner[r]``: the edit whose ΔW row ``r`` sees; ``edit_rows[e]``: the row of edit ``e``'s own
    prompt; ``partner[p]``: the contrast pair ``p`` is compared with (-1: none).
    """

    batch: TeacherForcedBatch
    role: torch.Tensor  # (n_pairs,)
    owner: torch.Tensor  # (rows,)
    edit_rows: list[int]
    n_edits: int
    keys: list[tuple[str, str]]  # per pair: (prompt, target)
    loc_new_token: torch.Tensor  # per locality pair: first token of target_new after its prompt
    partner: torch.Tensor  # (n_pairs,)

    @classmethod
    def build(
        cls, lm: LoadedModel, requests: Sequence[EditRequest], contrasts: bool = False
    ) -> MetaBatch:
        """The batch for ``requests``; ``contrasts`` adds the pairs CounterFact compares each
        scored pair with (validation only: the meta-loss does not use them). Requests without a
        true target get no edit/paraphrase contrast and are judged by exact match instead."""
        prompts, targets, roles, owners, loc_new, partner = [], [], [], [], [], []

        def add(prompt: str, target: str, role: int, edit: int, against: str | None) -> None:
            prompts.append(prompt)
            targets.append(target)
            roles.append(role)
            owners.append(edit)
            partner.append(-1)
            if contrasts and against is not None:
                partner[-1] = len(prompts)
                add(prompt, against, CONTRAST[role], edit, None)

        for e, request in enumerate(requests):
            add(request.prompt, request.target_new, EDIT, e, request.target_true)
            for paraphrase in request.paraphrases[:1]:
                add(paraphrase, request.target_new, PARAPHRASE, e, request.target_true)
            for probe in request.locality[:1]:
                add(probe.prompt, probe.answer, LOCALITY, e, request.target_new)
                loc_new.append(encode_target(lm, probe.prompt, request.target_new)[0])
        batch = build_batch(lm, prompts, targets, share_prefixes=False)
        owner = torch.zeros(batch.input_ids.shape[0], dtype=torch.long)
        edit_rows = [0] * len(requests)
        for pair, row in enumerate(batch.rows_of_pairs):
            owner[row] = owners[pair]
            if roles[pair] == EDIT:
                edit_rows[owners[pair]] = row
        keys = list(zip(prompts, targets))
        return cls(
            batch,
            torch.tensor(roles),
            owner,
            edit_rows,
            len(requests),
            keys,
            torch.tensor(loc_new, dtype=torch.long),
            torch.tensor(partner, dtype=torch.long),
        )

    def token_role(self) -> torch.Tensor:
        return self.role.to(self.batch.pair_index.device)[self.batch.pair_index]


class LowerCache:
    """Hidden states entering block ``start`` (the lowest edited one) per (prompt, target) pair.

    The blocks below ``start`` compute the same thing whatever the edit, so each record's pass
    through them is made once and kept: after the first epoch a training step only runs the
    edited blocks. ``limit`` bounds the pairs kept (about 3 per record; each S x d floats).
    """

    def __init__(self, lm: LoadedModel, start: int, limit: int | None = None) -> None:
        self.lm, self.start, self.limit = lm, start, limit
        self.block = lm.adapter.layer_name(start)
        self.store: dict[tuple[str, str], torch.Tensor] = {}

    def hidden(self, mb: MetaBatch) -> torch.Tensor:
        """(rows, S, d) hidden states entering block ``start`` for ``mb``'s batch."""
        batch, keys = mb.batch, mb.keys
        if any(key not in self.store for key in keys):
            with (
                torch.no_grad(),
                capture(self.lm.model, self.block, inputs=True, outputs=False, stop=True) as seen,
            ):
                hidden_states(self.lm, batch.input_ids, batch.attention_mask)
            computed = seen[self.block].input
            if self.limit is not None and len(self.store) + len(keys) > self.limit:
                return computed
            for pair, key in enumerate(keys):
                row = batch.rows_of_pairs[pair]
                length = int(batch.attention_mask[row].sum())
                self.store[key] = computed[row, :length].clone()
        first = self.store[keys[0]]
        rows, width = batch.input_ids.shape
        out = first.new_zeros(rows, width, first.shape[-1])
        for pair, key in enumerate(keys):
            kept = self.store[key]
            out[batch.rows_of_pairs[pair], : len(kept)] = kept
        return out


@dataclass
class Reference:
    """What the unedited model gives on a meta-batch: the edit's (u, δ), the locality
    log-distributions (N_loc, vocab), and the hidden state (rows, S, d) entering block ``start``,
    the lowest edited one (the passes over the blocks above start from it)."""

    grads: TokenGrads
    locality_logprobs: torch.Tensor
    start: int
    hidden: torch.Tensor


def rows_of(batch: TeacherForcedBatch, rows: Sequence[int]) -> TeacherForcedBatch:
    """The sub-batch made of ``rows`` (in that order) with their scored tokens (order kept);
    pairs read from other rows are left without tokens."""
    index = torch.as_tensor(list(rows), device=batch.input_ids.device)
    remap = torch.full((batch.input_ids.shape[0],), -1, device=index.device)
    remap[index] = torch.arange(len(index), device=index.device)
    keep = remap[batch.rows] >= 0
    return TeacherForcedBatch(
        input_ids=batch.input_ids[index],
        attention_mask=batch.attention_mask[index],
        rows=remap[batch.rows[keep]],
        positions=batch.positions[keep],
        token_ids=batch.token_ids[keep],
        pair_index=batch.pair_index[keep],
        is_target=batch.is_target[keep],
        prompt_lengths=batch.prompt_lengths,
        rows_of_pairs=[int(remap[r]) for r in batch.rows_of_pairs],
        n_pairs=batch.n_pairs,
    )


def reference(
    lm: LoadedModel, mb: MetaBatch, names: Sequence[str], cache: LowerCache | None = None
) -> Reference:
    """Pass 1: the frozen model's δ from the edit prompts' NLL (edit rows only, with grad) and
    its locality distributions (locality rows only, no grad); paraphrase rows need nothing here
    but their hidden state entering the edited blocks."""
    batch = mb.batch
    start = lowest_layer(lm.adapter, names)
    if cache is None or cache.start != start:
        cache = LowerCache(lm, start, limit=0)
    hidden = cache.hidden(mb)
    edits = rows_of(batch, mb.edit_rows)
    with (
        torch.enable_grad(),
        _from_start(lm, start, hidden[mb.edit_rows]),
        record_io(lm.model, names) as records,
    ):
        logprobs = scored_logprobs(lm, edits)
        chosen = logprobs.gather(1, edits.token_ids[:, None]).squeeze(1)
        loss = -pair_means(chosen, edits).sum()
        grads = token_grads(records, loss, range(mb.n_edits), edits.attention_mask)
    role = mb.role.tolist()
    loc_rows = [batch.rows_of_pairs[p] for p in range(batch.n_pairs) if role[p] == LOCALITY]
    if loc_rows:
        with torch.no_grad(), _from_start(lm, start, hidden[loc_rows]):
            locality = scored_logprobs(lm, rows_of(batch, loc_rows))
    else:
        locality = logprobs.detach()[:0]
    return Reference(grads, locality, start, hidden)


@contextmanager
def _from_start(lm: LoadedModel, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Skip the blocks below ``start``: ``hidden`` is what they would give."""
    adapter = lm.adapter
    skipped = [adapter.layer_name(layer) for layer in range(start)]
    with resume_at(lm.model, skipped, adapter.layer_name(start), hidden):
        yield


def meta_loss(
    lm: LoadedModel,
    mb: MetaBatch,
    ref: Reference,
    network: MENDNetwork,
    config: MENDTrainConfig,
    step_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pass 2: the edited model on the meta-batch; the loss and its metrics (see module doc)."""
    batch = mb.batch
    factors = network.factors(ref.grads, step_scale)
    with _from_start(lm, ref.start, ref.hidden), edited_forward(lm, factors, mb.owner):
        logprobs = scored_logprobs(lm, batch)
    chosen = logprobs.gather(1, batch.token_ids[:, None]).squeeze(1)
    hits = (logprobs.argmax(-1) == batch.token_ids).float()
    role = mb.role.to(chosen.device)
    mean_logprob = pair_means(chosen, batch)
    exact = pair_means(hits, batch) == 1.0
    is_loc = mb.token_role() == LOCALITY
    loc_ref = ref.locality_logprobs
    kl_tokens = (loc_ref.exp() * (loc_ref - logprobs[is_loc])).sum(-1)
    changed = (logprobs[is_loc].argmax(-1) != loc_ref.argmax(-1)).float()
    wants_edit = (role == EDIT) | (role == PARAPHRASE)
    edit_loss = -mean_logprob[wants_edit].mean()
    loc_loss = kl_tokens.mean() if len(kl_tokens) else edit_loss.new_zeros(())
    loss = config.edit_weight * edit_loss + config.loc_weight * loc_loss
    wins = _wins(mb, mean_logprob.detach(), exact)
    if bool((mb.partner[mb.role == LOCALITY] >= 0).all()):
        neighbours = wins[role == LOCALITY]
    else:  # training batches carry no contrast pairs: judge neighbours by first tokens
        neighbours = _neighbour_kept(mb, logprobs[is_loc])
    stats = {
        "loss": float(loss.detach()),
        "nll": float(edit_loss.detach()),
        "kl": float(loc_loss.detach()),
        "es": _share(wins[role == EDIT]),
        "ps": _share(wins[role == PARAPHRASE]),
        "ns": _share(neighbours, empty=1.0),
        "exact": _share(exact[role == EDIT]),
        "dd": float(changed.mean()) if len(changed) else 0.0,
    }
    return loss, stats


def _share(flags: torch.Tensor, empty: float = 0.0) -> float:
    return float(flags.float().mean()) if len(flags) else empty


def _wins(mb: MetaBatch, mean_logprob: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per pair: does its target beat its contrast pair's (CounterFact's comparison of mean
    per-token log-probs)? Pairs without a contrast count as won when every target token is the
    argmax."""
    partner = mb.partner.to(mean_logprob.device)
    wins = exact.clone()
    has = partner >= 0
    wins[has] = mean_logprob[has] > mean_logprob[partner[has]]
    return wins


def _neighbour_kept(mb: MetaBatch, locality: torch.Tensor) -> torch.Tensor:
    """Per locality probe: does the model still prefer the probe's answer to the edit's new
    target, judged by their first tokens after the probe's prompt (CounterFact's neighbourhood
    success, to first-token precision; the progress bar's NS, without contrast pairs)?
    ``locality``: (N_loc, vocab) log-distributions."""
    pairs = mb.batch.pair_index[mb.token_role() == LOCALITY]
    if len(pairs) == 0:
        return locality.new_zeros(0)
    first = torch.ones_like(pairs, dtype=torch.bool)
    first[1:] = pairs[1:] != pairs[:-1]
    answer = mb.batch.token_ids[mb.token_role() == LOCALITY][first]
    at_prompt_end = locality[first]
    new = mb.loc_new_token.to(answer.device)
    return (
        at_prompt_end.gather(1, answer[:, None]) >= at_prompt_end.gather(1, new[:, None])
    ).float()


# ---- evaluation on held-out edits -------------------------------------------------------------
def _batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def validate(
    lm: LoadedModel,
    network: MENDNetwork,
    requests: Sequence[EditRequest],
    config: MENDTrainConfig,
    step_scale: float = 1.0,
    cache: LowerCache | None = None,
) -> dict[str, float]:
    """Mean metrics of the editor over ``requests`` (each edit applied alone), plus ``score``."""
    totals: dict[str, float] = {}
    for chunk in _batches(requests, config.batch_size):
        mb = MetaBatch.build(lm, chunk, contrasts=True)
        ref = reference(lm, mb, network.parameter_names, cache)
        with torch.no_grad():
            _, stats = meta_loss(lm, mb, ref, network, config, step_scale)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value * len(chunk)
    result = {key: value / len(requests) for key, value in totals.items()}
    result["score"] = _harmonic(result["es"], result["ps"], result["ns"])
    return result


def _harmonic(*values: float) -> float:
    """Harmonic mean (0 when any value is 0), as CounterFact's score of ES, PS and NS."""
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1 / v for v in values)


# ---- set-up before training -------------------------------------------------------------------
def build_network(lm: LoadedModel, config: MENDTrainConfig) -> MENDNetwork:
    """An untrained editor for ``lm``'s chosen matrices (statistics not yet calibrated)."""
    names = edited_parameter_names(lm.adapter, config.layers, config.matrices)
    shapes = {n: lm.adapter.matrix_shape(n) for n in names}
    return MENDNetwork(shapes, config.rank, precondition=config.precondition)


def untrained_editor(
    lm: LoadedModel,
    train: Sequence[EditRequest],
    config: MENDTrainConfig,
    cache: LowerCache | None = None,
) -> tuple[MENDNetwork, dict[str, Any]]:
    """The editor meta-training starts from (seeded, calibrated on the first
    ``calibration_edits`` training records) and its calibration record: what
    :func:`train_mend` trains, and the baseline benchmarks compare it with."""
    torch.manual_seed(config.seed)
    network = build_network(lm, config)
    calibration = calibrate(lm, network, train[: config.calibration_edits], config, cache)
    return network, calibration


def calibrate(
    lm: LoadedModel,
    network: MENDNetwork,
    requests: Sequence[EditRequest],
    config: MENDTrainConfig,
    cache: LowerCache | None = None,
) -> dict[str, Any]:
    """Measure the (u, δ) statistics on ``requests`` and line-search the initial step size
    (on the first two batches, by the meta-training loss)."""
    names = network.parameter_names
    if network.precondition:
        found = input_statistics(lm, names, config.stats_corpus, config.stats_samples)
        network.set_key_statistics({n: found[n].moment for n in names}, config.ridge)
    refs = []
    for chunk in _batches(requests, config.batch_size):
        mb = MetaBatch.build(lm, chunk)
        refs.append((mb, reference(lm, mb, names, cache)))
    tokens = network.calibrate(ref.grads for _, ref in refs)
    search = refs[:2]

    def loss_at(log10_step: float) -> float:
        network.set_step(10.0**log10_step)
        with torch.no_grad():
            losses = [meta_loss(lm, mb, ref, network, config)[0].item() for mb, ref in search]
        return sum(losses) / len(losses)

    grid = {x: loss_at(x) for x in range(-8, 0)}
    best = min(grid, key=lambda x: grid[x] if math.isfinite(grid[x]) else math.inf)
    for x in (best - 0.5, best + 0.5):
        grid[x] = loss_at(x)
    best = min(grid, key=lambda x: grid[x] if math.isfinite(grid[x]) else math.inf)
    network.set_step(10.0**best)
    log.info("calibrated on %d tokens; initial step size %.1e", tokens, 10.0**best)
    return {"tokens": tokens, "initial_step": 10.0**best, "line_search": grid}


# ---- the loop -------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """A trained editor and how it got there."""

    network: MENDNetwork
    steps: int
    seconds: float
    stopped: str  # "steps", "patience" or "time"
    untrained: dict[str, float]
    best: dict[str, float]
    unedited: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    n_train: int = 0
    n_val: int = 0
    step_scale: float = 1.0
    step_scale_scan: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "stopped": self.stopped,
            "train_records": self.n_train,
            "val_records": self.n_val,
            "unedited_validation": self.unedited,
            "untrained_validation": self.untrained,
            "best_validation": self.best,
            "history": self.history,
            "initial_step": self.calibration.get("initial_step"),
            "step_sizes": self.network.step_sizes(),
            "step_scale": self.step_scale,
            "step_scale_scan": self.step_scale_scan,
        }


def choose_step_scale(
    lm: LoadedModel,
    network: MENDNetwork,
    val: Sequence[EditRequest],
    config: MENDTrainConfig,
    cache: LowerCache | None = None,
) -> tuple[float, dict[str, dict[str, float]]]:
    """The multiple of the learned step sizes with the best validation score, and every scale's
    validation. Meta-training weighs edit success against locality with fixed loss weights; one
    scalar chosen on held-out edits moves the trained editor along that trade-off to where
    CounterFact's score (the harmonic mean of ES, PS and NS) is best."""
    scan = {
        str(scale): validate(lm, network, val, config, step_scale=scale, cache=cache)
        for scale in config.step_scales
    }
    # ties (e.g. all zero on a tiny slice) keep the learned steps as they are, or nearest to them
    best = max(scan, key=lambda s: (scan[s]["score"], -abs(float(s) - 1.0)))
    return float(best), scan


def split_records(
    requests: Sequence[EditRequest], config: MENDTrainConfig
) -> tuple[list[EditRequest], list[EditRequest]]:
    """Shuffle (seeded) and hold out ``val_size`` records: (train, validation)."""
    if len(requests) <= config.val_size:
        raise ConfigError(
            f"{len(requests)} records cannot hold out val_size={config.val_size} and still train"
        )
    order = list(requests)
    random.Random(config.seed).shuffle(order)
    val, train = order[: config.val_size], order[config.val_size :]
    if config.max_train is not None:
        train = train[: config.max_train]
    return train, val


def train_mend(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    config: MENDTrainConfig | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """Meta-train a MEND editor for ``lm`` on edit ``requests`` (see the module docstring).

    The base model is never modified. Returns the best editor by validation score.
    """
    config = config or MENDTrainConfig.for_model(lm.model_type)
    start = time.monotonic()
    deadline = start + 60 * config.max_minutes if config.max_minutes is not None else math.inf
    train, val = split_records(requests, config)
    names = edited_parameter_names(lm.adapter, config.layers, config.matrices)
    cache = LowerCache(lm, lowest_layer(lm.adapter, names))
    network, calibration = untrained_editor(lm, train, config, cache)
    unedited = validate(lm, network, val, config, step_scale=0.0, cache=cache)
    log.info("unedited model on %d held-out edits: %s", len(val), _fmt(unedited))
    untrained = validate(lm, network, val, config, cache=cache)
    log.info("untrained editor on %d held-out edits: %s", len(val), _fmt(untrained))
    best, best_state = dict(untrained, step=0), copy.deepcopy(network.state_dict())
    history = [dict(untrained, step=0, seconds=time.monotonic() - start)]

    step_params = [network.log_step]
    other = [p for n, p in network.named_parameters() if n != "log_step"]
    optimizer = torch.optim.Adam(
        [{"params": other, "lr": config.lr}, {"params": step_params, "lr": config.step_lr}]
    )
    rng = random.Random(config.seed + 1)
    order: list[EditRequest] = []
    running: dict[str, float] = {}
    stale, step, stopped = 0, 0, "steps"
    bar = tqdm(total=config.steps, desc="meta-training MEND", disable=not progress, unit="step")
    try:
        while step < config.steps:
            if time.monotonic() > deadline:
                stopped = "time"
                break
            if len(order) < config.batch_size:
                order = list(train)
                rng.shuffle(order)
            chunk, order = order[: config.batch_size], order[config.batch_size :]
            mb = MetaBatch.build(lm, chunk)
            ref = reference(lm, mb, network.parameter_names, cache)
            loss, stats = meta_loss(lm, mb, ref, network, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            for key, value in stats.items():
                running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
            bar.update(1)
            bar.set_postfix(
                loss=f"{running['loss']:.2f}",
                edit_top1=f"{running['es']:.2f}",  # no contrast pairs in training batches:
                para_top1=f"{running['ps']:.2f}",  # argmax success, stricter than validation's
                ns=f"{running['ns']:.2f}",
                drawdown=f"{running['dd']:.3f}",
                best=f"{best['score']:.3f}",
            )
            if step % config.val_every == 0 or step == config.steps:
                result = validate(lm, network, val, config, cache=cache)
                history.append(dict(result, step=step, seconds=time.monotonic() - start))
                log.info("step %d validation: %s", step, _fmt(result))
                if result["score"] > best["score"]:
                    best, stale = dict(result, step=step), 0
                    best_state = copy.deepcopy(network.state_dict())
                else:
                    stale += 1
                    if stale >= config.patience:
                        stopped = "patience"
                        break
    finally:
        bar.close()
    if step % config.val_every and stopped == "time":
        result = validate(lm, network, val, config, cache=cache)
        history.append(dict(result, step=step, seconds=time.monotonic() - start))
        if result["score"] > best["score"]:
            best, best_state = dict(result, step=step), copy.deepcopy(network.state_dict())
    network.load_state_dict(best_state)
    step_scale, scan = 1.0, {}
    if config.step_scales:
        step_scale, scan = choose_step_scale(lm, network, val, config, cache)
        log.info("step scale x%s: %s", step_scale, _fmt(scan[str(step_scale)]))
    seconds = time.monotonic() - start
    log.info(
        "MEND trained %d steps in %.0f s (stopped: %s); best validation at step %d: %s",
        step,
        seconds,
        stopped,
        best["step"],
        _fmt(best),
    )
    return TrainResult(
        network=network,
        steps=step,
        seconds=seconds,
        stopped=stopped,
        untrained=untrained,
        best=best,
        unedited=unedited,
        history=history,
        calibration=calibration,
        n_train=len(train),
        n_val=len(val),
        step_scale=step_scale,
        step_scale_scan=scan,
    )


def _fmt(stats: dict[str, float]) -> str:
    keys = ("es", "ps", "ns", "exact", "dd", "nll", "kl", "score")
    return " ".join(f"{k}={stats[k]:.3f}" for k in keys if k in stats)
