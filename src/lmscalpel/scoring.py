"""Teacher-forced log-probabilities of continuations, next-token distributions and greedy generation.

Scoring is batched and shares work: pairs are grouped by prompt, and a continuation whose fed
tokens are a prefix of another's is read off the longer row (so a prompt's forward pass serves
every target's first token, and single-token targets cost no extra pass). The LM head runs only at
the positions whose predictions are read. Rows are right-padded, so batched and one-by-one results
agree to float precision.

:func:`token_logprobs` is the differentiable core that fine-tuning, ROME's value optimisation and
MEND's losses reuse; :func:`score_targets` is the no-grad, batched front end for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.kv import run_after, run_body, run_prefix
from lmscalpel.tokens import encode_prompt, encode_target


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced score of one target after one prompt.

    ``token_logprobs[i]`` is log P(token i | prompt, tokens < i); ``argmax_hits[i]`` whether that
    token was the model's top-1 prediction there, and ``argmax_ids[i]`` what that prediction was
    (evaluation compares them before and after an edit to see whether an output changed).
    """

    token_ids: tuple[int, ...]
    token_logprobs: tuple[float, ...]
    argmax_hits: tuple[bool, ...]
    argmax_ids: tuple[int, ...] = ()

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / len(self.token_logprobs)

    @property
    def prob(self) -> float:
        """P(whole target | prompt)."""
        return math.exp(self.sum_logprob)

    @property
    def token_accuracy(self) -> float:
        """Share of target tokens that were the argmax under teacher forcing."""
        return sum(self.argmax_hits) / len(self.argmax_hits)


@dataclass
class TeacherForcedBatch:
    """Right-padded token rows plus, for every scored token, where to read its prediction.

    ``rows[n]``, ``positions[n]``: the logits at (row, position) predict ``token_ids[n]``, which
    belongs to pair ``pair_index[n]`` (or, for prompt tokens, to the pair's prompt).
    ``is_target[n]`` tells target tokens from prompt tokens.
    """

    input_ids: torch.Tensor  # (B, S)
    attention_mask: torch.Tensor  # (B, S)
    rows: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,)
    token_ids: torch.Tensor  # (N,)
    pair_index: torch.Tensor  # (N,)
    is_target: torch.Tensor  # (N,) bool
    prompt_lengths: list[int]  # per pair: tokens in its formatted prompt
    rows_of_pairs: list[int]  # per pair: the row it is read from
    n_pairs: int


def pad_token_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def build_batch(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    include_prompt_tokens: bool = False,
    share_prefixes: bool = True,
) -> TeacherForcedBatch:
    """Tokenize (prompt, target) pairs into one teacher-forced batch.

    With ``include_prompt_tokens`` the prompt's own tokens (after the first) are scored too, as in
    ordinary language-model fine-tuning. With ``share_prefixes`` a pair whose fed tokens are a
    prefix of another pair's row is read from that row instead of getting its own.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    encoded = []
    for prompt, target in zip(prompts, targets):
        prompt_ids = encode_prompt(lm, prompt)
        target_ids = encode_target(lm, prompt, target)
        encoded.append((prompt_ids, target_ids))

    # Rows to run: longest first, so shorter fed sequences can be found as prefixes of a row.
    fed = [tuple(p + t[:-1]) for p, t in encoded]
    order = sorted(range(len(fed)), key=lambda i: -len(fed[i]))
    row_seqs: list[tuple[int, ...]] = []
    row_of_pair = [0] * len(fed)
    for i in order:
        seq = fed[i]
        found = None
        if share_prefixes:
            for r, row in enumerate(row_seqs):
                if len(row) >= len(seq) and row[: len(seq)] == seq:
                    found = r
                    break
        if found is None:
            row_seqs.append(seq)
            found = len(row_seqs) - 1
        row_of_pair[i] = found

    width = max(len(s) for s in row_seqs)
    pad = pad_token_id(lm)
    input_ids = torch.full((len(row_seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(row_seqs), width), dtype=torch.long)
    for r, seq in enumerate(row_seqs):
        input_ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[r, : len(seq)] = 1

    rows, positions, token_ids, pair_index, is_target = [], [], [], [], []
    for i, (prompt_ids, target_ids) in enumerate(encoded):
        row = row_of_pair[i]
        if include_prompt_tokens:
            for pos in range(len(prompt_ids) - 1):
                rows.append(row)
                positions.append(pos)
                token_ids.append(prompt_ids[pos + 1])
                pair_index.append(i)
                is_target.append(False)
        for j, token in enumerate(target_ids):
            rows.append(row)
            positions.append(len(prompt_ids) - 1 + j)
            token_ids.append(token)
            pair_index.append(i)
            is_target.append(True)

    device = lm.device
    return TeacherForcedBatch(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        rows=torch.tensor(rows, device=device),
        positions=torch.tensor(positions, device=device),
        token_ids=torch.tensor(token_ids, device=device),
        pair_index=torch.tensor(pair_index, device=device),
        is_target=torch.tensor(is_target, device=device),
        prompt_lengths=[len(p) for p, _ in encoded],
        rows_of_pairs=row_of_pair,
        n_pairs=len(encoded),
    )


def right_padded(
    lm: LoadedModel, rows: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as right-padded ``input_ids`` and ``attention_mask`` (B, max length) on the
    model's device."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id(lm), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids.to(lm.device), mask.to(lm.device)


MIN_SHARED_PREFIX = 32  # tokens; shorter common prefixes are not worth a second pass


def _shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading positions where every row holds the same real token (at most S - 1)."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    return min(int(same.long().cumprod(0).sum()), input_ids.shape[1] - 1)


def _has_hooks(model: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def hidden_states(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Final (normalised) hidden states (B, S, d) of the transformer body, without the LM head.

    Without gradients and hooks, a long prefix that all rows share (e.g. an in-context edit's
    demonstrations, read before every probe) runs once and its key/value cache serves every row
    (:func:`lmscalpel.runtime.kv.run_prefix`); rows are right-padded, so positions are unchanged
    and the result equals one full pass.
    """
    prefix = 0
    if not torch.is_grad_enabled() and input_ids.shape[0] > 1:
        prefix = _shared_prefix_length(input_ids, attention_mask)
        if prefix >= MIN_SHARED_PREFIX and _has_hooks(lm.model):
            prefix = 0  # a hook may index absolute positions: keep one pass
    if prefix < MIN_SHARED_PREFIX:
        return run_body(lm, input_ids, attention_mask).hidden
    rows = input_ids.shape[0]
    head = run_prefix(lm, input_ids[:1, :prefix], attention_mask[:1, :prefix])
    tail = run_after(lm, head, input_ids[:, prefix:], attention_mask, rows=rows)
    return torch.cat([head.hidden.expand(rows, -1, -1), tail.hidden], 1)


def token_logprobs(lm: LoadedModel, batch: TeacherForcedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (N,) of every scored token of ``batch`` and whether each was the argmax.

    Differentiable (no ``no_grad`` here): methods build their losses on it. Any hooks installed on
    the model are active during the forward pass.
    """
    chosen, top = _logprobs_and_argmax(lm, batch)
    return chosen, top == batch.token_ids


def _logprobs_and_argmax(
    lm: LoadedModel, batch: TeacherForcedBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (N,) of the scored tokens and the argmax token id (N,) at each position."""
    hidden = hidden_states(lm, batch.input_ids, batch.attention_mask)
    logits = lm.adapter.logits(hidden[batch.rows, batch.positions]).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, batch.token_ids[:, None]).squeeze(1)
    return chosen, logits.argmax(dim=-1)


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def score_targets(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 16,
) -> list[TargetScore]:
    """Teacher-forced scores of ``targets[i]`` after ``prompts[i]`` (batched, no grad).

    Pairs that share a prompt are scored in the same batch so that their forward passes are shared.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    # Keep pairs with the same prompt together; batch_size counts distinct prompts.
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(i)
    groups = sorted(by_prompt.values(), key=lambda idx: len(prompts[idx[0]]))
    results: list[TargetScore | None] = [None] * len(prompts)
    with torch.no_grad():
        for chunk in _chunks(len(groups), batch_size):
            indices = [i for g in chunk for i in groups[g]]
            batch = build_batch(lm, [prompts[i] for i in indices], [targets[i] for i in indices])
            logprobs, top = _logprobs_and_argmax(lm, batch)
            pairs = batch.pair_index.tolist()
            ids, lps, tops = batch.token_ids.tolist(), logprobs.tolist(), top.tolist()
            collected: dict[int, tuple[list, list, list]] = {}
            for n, pair in enumerate(pairs):
                slot = collected.setdefault(pair, ([], [], []))
                slot[0].append(ids[n])
                slot[1].append(lps[n])
                slot[2].append(tops[n])
            for pair, (tid, lp, tp) in collected.items():
                hits = tuple(a == b for a, b in zip(tid, tp))
                results[indices[pair]] = TargetScore(tuple(tid), tuple(lp), hits, tuple(tp))
    return results  # type: ignore[return-value]


def next_token_logprobs(
    lm: LoadedModel, prompts: Sequence[str], *, batch_size: int = 16
) -> torch.Tensor:
    """Log-distribution (len(prompts), vocab) of the token after each prompt."""
    out = []
    with torch.no_grad():
        for chunk in _chunks(len(prompts), batch_size):
            seqs = [encode_prompt(lm, prompts[i]) for i in chunk]
            hidden = hidden_states(lm, *right_padded(lm, seqs))
            last = torch.tensor([len(s) - 1 for s in seqs], device=lm.device)
            logits = lm.adapter.logits(hidden[torch.arange(len(seqs)), last]).float()
            out.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def top_tokens(
    lm: LoadedModel, prompts: Sequence[str], k: int = 5
) -> list[list[tuple[str, float]]]:
    """The ``k`` most likely next tokens of each prompt, decoded, with their probabilities."""
    logprobs = next_token_logprobs(lm, prompts)
    values, indices = logprobs.topk(k, dim=-1)
    return [
        [(lm.tokenizer.decode([int(t)]), math.exp(float(v))) for v, t in zip(vs, ts)]
        for vs, ts in zip(values, indices)
    ]


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    batch_size: int = 8,
    sample: bool = False,
    top_k: int = 50,
    seed: int = 0,
) -> list[str]:
    """Continuations of each prompt (the new text only, special tokens removed).

    Greedy by default; with ``sample`` drawn from the top ``top_k`` tokens at temperature 1,
    reproducibly for a given ``seed`` (the global random state is left as it was).
    """
    tok = lm.tokenizer
    pad = pad_token_id(lm)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        top_k=top_k if sample else None,
        temperature=1.0 if sample else None,
        top_p=None,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )
    texts: list[str] = []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for chunk in _chunks(len(prompts), batch_size):
            seqs = [encode_prompt(lm, prompts[i]) for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, seq in enumerate(seqs):  # left padding: new tokens line up at the end
                ids[r, width - len(seq) :] = torch.tensor(seq)
                mask[r, width - len(seq) :] = 1
            out = lm.model.generate(
                input_ids=ids.to(lm.device),
                attention_mask=mask.to(lm.device),
                generation_config=config,
            )
            for row in out[:, width:]:
                texts.append(tok.decode(row, skip_special_tokens=True))
    return texts
