"""The editor scored on held-out edits, and the step scale chosen on them.

CounterFact's comparisons as its benchmark scores them (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", §3): ES, PS, NS and their harmonic mean, the score; each edit is
applied alone, as MEND's meta-training applies it (Mitchell et al. 2022, "Fast Model Editing at
Scale").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.mend.batches import MetaBatch, chunks
from lmscalpel.methods.mend.config import MENDTrainConfig
from lmscalpel.methods.mend.losses import meta_loss
from lmscalpel.methods.mend.lower import LowerCache
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.methods.mend.reference import reference
from lmscalpel.models.loaded import LoadedModel


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
    for chunk in chunks(requests, config.batch_size):
        mb = MetaBatch.build(lm, chunk, contrasts=True)
        ref = reference(lm, mb, network.parameter_names, cache)
        with torch.no_grad():
            _, stats = meta_loss(lm, mb, ref, network, config, step_scale)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value * len(chunk)
    result = {key: value / len(requests) for key, value in totals.items()}
    result["score"] = harmonic_mean(result["es"], result["ps"], result["ns"])
    return result


def harmonic_mean(*values: float) -> float:
    """Harmonic mean (0 when any value is 0), as CounterFact's score of ES, PS and NS."""
    if min(values) <= 0:
        return 0.0
    return len(values) / sum(1 / v for v in values)


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
