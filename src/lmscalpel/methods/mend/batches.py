"""One meta-batch: the edit, paraphrase and locality prompts of several edits, teacher-forced.

Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1: each meta-training step scores
every edit's own prompt and its equivalence neighbourhood (here: one paraphrase) for the edit
loss, and an unrelated prompt for the locality loss. Validation adds the pairs CounterFact
compares each of them with (Meng et al. 2022, "Locating and Editing Factual Associations in
GPT", §3: efficacy, paraphrase and neighbourhood scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmscalpel.core.requests import EditRequest, Probe
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.scoring import TeacherForcedBatch, build_batch
from lmscalpel.tokens import encode_target

EDIT, PARAPHRASE, LOCALITY = 0, 1, 2  # the pairs the meta-loss trains on
# score-only pairs for CounterFact's comparisons at validation: the true target after the edit
# prompt and the paraphrase, the new target after the locality prompt
EDIT_TRUE, PARAPHRASE_TRUE, LOCALITY_NEW = 3, 4, 5
CONTRAST = {EDIT: EDIT_TRUE, PARAPHRASE: PARAPHRASE_TRUE, LOCALITY: LOCALITY_NEW}
ROLE = {"edit": EDIT, "paraphrase": PARAPHRASE, "locality": LOCALITY}


def trained_probes(request: EditRequest) -> list[Probe]:
    """The probes of ``request`` a meta-batch scores, in :meth:`EditRequest.probes` order: the
    edit prompt, its first paraphrase and its first locality probe (those it has). Each probe's
    ``other`` is the target it is compared with (``target_true`` for the edit prompt and the
    paraphrase, ``target_new`` for the locality probe)."""
    first: dict[str, Probe] = {}
    for probe in request.probes():
        if probe.role in ROLE:
            first.setdefault(probe.role, probe)
    return list(first.values())


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
            for probe in trained_probes(request):
                add(probe.prompt, probe.wanted, ROLE[probe.role], e, probe.other)
                if probe.role == "locality":  # other: the edit's target_new
                    loc_new.append(encode_target(lm, probe.prompt, probe.other)[0])
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
        """(N,) the role of each scored token's pair."""
        return self.role.to(self.batch.pair_index.device)[self.batch.pair_index]


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


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """``items`` in consecutive slices of at most ``size`` (one meta-batch each)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
