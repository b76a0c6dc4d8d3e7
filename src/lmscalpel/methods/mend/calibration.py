"""The editor meta-training starts from: built, standardised and given a sensible step size.

Mitchell et al. 2022, "Fast Model Editing at Scale", §3.2 (inputs to the gradient transform are
standardised); the initial step size η is chosen by a line search on the meta-training loss, so
that the untrained editor is already a well-scaled gradient step. With ``precondition`` the
input statistics C of each matrix are measured first (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", eq. 2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from lmscalpel.core.requests import EditRequest
from lmscalpel.mechanics.stats import input_statistics
from lmscalpel.methods.mend.batches import MetaBatch, chunks
from lmscalpel.methods.mend.config import MENDTrainConfig
from lmscalpel.methods.mend.grads import edited_parameter_names
from lmscalpel.methods.mend.losses import meta_loss
from lmscalpel.methods.mend.lower import LowerCache
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.methods.mend.reference import reference
from lmscalpel.models.loaded import LoadedModel

log = logging.getLogger(__name__)


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
    :func:`~lmscalpel.methods.mend.train.train_mend` trains, and the baseline benchmarks compare
    it with."""
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
    for chunk in chunks(requests, config.batch_size):
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
