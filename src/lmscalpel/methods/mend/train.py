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
pass through the blocks below is made once and kept (:class:`.lower.LowerCache`): the first epoch
over the training records costs about one forward pass per prompt, later ones a tenth of that
(with the default three top layers of a 30-layer model).

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

The parts, one module each: :mod:`.config` (the hyperparameters), :mod:`.batches` (one
meta-batch), :mod:`.lower` (the kept lower blocks), :mod:`.reference` (pass 1, the unedited
model), :mod:`.losses` (pass 2, the meta-loss and metrics), :mod:`.validation` (held-out scores,
the step scale), :mod:`.calibration` (the untrained editor); this module holds the loop.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from lmscalpel.core.config import ConfigError
from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.mend.batches import MetaBatch
from lmscalpel.methods.mend.calibration import untrained_editor
from lmscalpel.methods.mend.config import MENDTrainConfig
from lmscalpel.methods.mend.grads import edited_parameter_names, lowest_layer
from lmscalpel.methods.mend.losses import meta_loss
from lmscalpel.methods.mend.lower import LowerCache
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.methods.mend.reference import reference
from lmscalpel.methods.mend.validation import choose_step_scale, validate
from lmscalpel.models.loaded import LoadedModel

log = logging.getLogger(__name__)


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
