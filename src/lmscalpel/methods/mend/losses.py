"""Pass 2 of a meta-training step: the edited model, its meta-loss and CounterFact's metrics.

Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1: the loss is
``edit_weight x NLL(target_new | edit prompt, paraphrase) + loc_weight x KL(original ‖ edited)``
on the locality prompts. The metrics are CounterFact's comparisons (Meng et al. 2022, "Locating
and Editing Factual Associations in GPT", §3): edit, paraphrase and neighbourhood success, plus
the share of locality tokens whose argmax changed (drawdown).
"""

from __future__ import annotations

import torch

from lmscalpel.methods.mend.batches import EDIT, LOCALITY, PARAPHRASE, MetaBatch
from lmscalpel.methods.mend.config import MENDTrainConfig
from lmscalpel.methods.mend.edited import edited_forward
from lmscalpel.methods.mend.grads import pair_means, scored_logprobs
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.methods.mend.reference import Reference
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.layers import from_layer


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
    with from_layer(lm, ref.start, ref.hidden), edited_forward(lm, factors, mb.owner):
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
