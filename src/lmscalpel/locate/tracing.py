"""Causal tracing: which hidden states carry a fact from the subject to the prediction.

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (Section 2.1, Figure 1).
Three runs of one prompt:

- **clean**: the prompt as is; P_clean is the probability of the answer's first token at the last
  position.
- **corrupted**: Gaussian noise (sigma = 3 x the std of subject-token embeddings, see
  :mod:`.noise`) added to the embeddings of the subject's tokens; P_corrupted averages the answer's
  probability over ``samples`` noise draws.
- **corrupted-with-restoration**: the corrupted run, except that one clean state is copied back at
  one token; P_restored(token, layer) averages over the same noise draws.

The indirect effect of a state is P_restored - P_corrupted. Three kinds of state:

- ``hidden``: the residual stream after layer ``l`` (one layer);
- ``mlp``: the MLP outputs of a window of ``window`` layers centred on ``l``;
- ``attn``: the attention outputs of the same window.

Speed. Restoring at layer ``l`` cannot change layers below it, so each restoration resumes the
corrupted forward pass at the first restored layer (:mod:`.restoration`) instead of re-running
the whole model; all (token, noise draw) rows of one layer run as one batch (chunked
to at most ``batch_tokens`` tokens); tokens before the subject are identical in the clean and
corrupted runs, so restoring them is a no-op that is not computed; and the LM head runs at the
last position only.

The result and its files are :class:`.result.TraceResult`; the restored runs are
:mod:`.restoration`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from lmscalpel.locate.noise import noise_level
from lmscalpel.locate.restoration import RestoredRuns, module_names
from lmscalpel.locate.result import TraceResult
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.stream import ResidualStream, check_replay, record_stream
from lmscalpel.tokens import encode_prompt, encode_target, subject_token_positions

log = logging.getLogger(__name__)

KINDS = ("hidden", "mlp", "attn")
"""What can be restored: the residual stream, MLP outputs, attention outputs."""

DEFAULT_SAMPLES = 10
MAX_WINDOW = 10
PRECISIONS = ("float32", "bfloat16")
REPLAY_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


class TracingError(ValueError):
    """Bad input to causal tracing (unknown kind, subject not in the prompt, ...)."""


def default_window(num_layers: int) -> int:
    """The paper's window of 10 layers for deep models, a third of the depth for shallow ones."""
    return max(1, min(MAX_WINDOW, num_layers // 3))


def noise_draws(samples: int, tokens: int, hidden: int, sigma: float, seed: int) -> torch.Tensor:
    """The Gaussian noise added to the subject's embeddings: (samples, tokens, hidden), drawn on
    the CPU from ``seed`` so that a trace repeats exactly on any device."""
    generator = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(samples, tokens, hidden, generator=generator)


def _check_kinds(kinds: Iterable[str] | str) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise TracingError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return list(dict.fromkeys(kinds))


def trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kinds: Iterable[str] | str = KINDS,
    samples: int = DEFAULT_SAMPLES,
    noise: float | None = None,
    window: int | None = None,
    positions: Sequence[int] | None = None,
    seed: int = 0,
    batch_tokens: int = 4096,
    precision: str = "float32",
    reuse_prefix: bool = True,
    progress: bool = False,
) -> TraceResult:
    """Causal trace of ``prompt``: P_restored for every (token, layer) and kind.

    Args:
        lm: the model; it is not changed (all hooks are removed, also on error).
        prompt: the prompt; ``subject`` must occur in it verbatim.
        answer: the answer whose first token is traced; ``None`` traces the model's own top
            prediction after the clean prompt.
        kinds: any of ``hidden``, ``mlp``, ``attn`` (default all three; the clean and corrupted
            runs are shared between them).
        samples: noise draws averaged over (the same draws for every restoration).
        noise: sigma of the Gaussian noise; ``None`` uses :func:`.noise.noise_level`
            (3 x the std of subject-token embeddings, cached per model).
        window: layers restored together for ``mlp`` and ``attn`` (default
            :func:`default_window`); ``hidden`` always restores one layer.
        positions: token indices to trace (default all); the others are NaN.
        seed: seed of the noise draws.
        batch_tokens: bound on batch x sequence per forward pass (memory).
        precision: ``float32``, or ``bfloat16`` to run every pass under bfloat16 autocast (about
            2.4x faster on a CPU with AVX512-BF16; probabilities move by about 0.005).
        reuse_prefix: recompute only the tokens from the restored one on, with the corrupted
            run's keys and values for the tokens before it (exact, and faster); ``False``
            recomputes whole sequences.
        progress: show a progress bar.

    Returns:
        A :class:`TraceResult`; ``restored[kind]`` is (tokens, layers).
    """
    started = time.perf_counter()
    kinds = _check_kinds(kinds)
    if samples < 1:
        raise TracingError(f"samples must be >= 1, got {samples}")
    a = lm.adapter
    n_layers = a.num_layers
    window = default_window(n_layers) if window is None else window
    if window < 1:
        raise TracingError(f"window must be >= 1, got {window}")
    if precision not in PRECISIONS:
        raise TracingError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    try:
        subject_pos = subject_token_positions(lm, prompt, subject)
    except ValueError as error:
        raise TracingError(str(error)) from None
    ids = encode_prompt(lm, prompt)
    n_tokens = len(ids)
    wanted = range(n_tokens) if positions is None else sorted(set(positions))
    if any(not 0 <= p < n_tokens for p in wanted):
        raise TracingError(f"positions {list(wanted)} out of range 0..{n_tokens - 1}")
    # Before the subject the corrupted run equals the clean one: restoring there changes nothing.
    traced = [p for p in wanted if p >= subject_pos[0]]
    sigma = noise_level(lm) if noise is None else float(noise)
    input_ids = torch.tensor([ids], device=lm.device)

    try:
        answer_token = None if answer is None else encode_target(lm, prompt, answer)[0]
    except ValueError as error:
        raise TracingError(str(error)) from None

    low = precision == "bfloat16"
    with (
        torch.no_grad(),
        torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=low),
    ):
        # Clean run: the residual stream, and the MLP / attention outputs to restore.
        extra = [name for kind in kinds if kind != "hidden" for name in module_names(lm, kind)]
        with tap(lm.model, dict.fromkeys(extra, Tap(output=True))) as clean_out:
            clean = record_stream(lm, input_ids, keep_kv=True)
        check_replay(lm, clean, atol=REPLAY_TOLERANCE[precision])
        clean_probs = torch.softmax(clean.logits[0].float(), dim=-1)
        if answer_token is None:
            answer_token = int(clean_probs.argmax())
            answer = lm.tokenizer.decode([answer_token])
        p_clean = float(clean_probs[answer_token])

        # Corrupted run: the same noise draws serve every restoration.
        draws = noise_draws(samples, len(subject_pos), a.hidden_size, sigma, seed)
        with tap(lm.model, {a.embeddings_name: Tap(replace=_add_noise(draws, subject_pos))}):
            corrupted = record_stream(lm, input_ids.expand(samples, -1), keep_kv=True)
        p_corrupted = float(torch.softmax(corrupted.logits.float(), -1)[:, answer_token].mean())

        restored = {}
        suffixes: dict[int, ResidualStream | None] = {}
        steps = tqdm(
            total=len(kinds) * len(traced), desc="tracing", disable=not progress, leave=False
        )
        for kind in kinds:
            runs = RestoredRuns(
                lm, kind, input_ids, clean, clean_out, corrupted, answer_token, batch_tokens,
                REPLAY_TOLERANCE[precision],
            )  # fmt: skip
            table = torch.full((n_tokens, n_layers), float("nan"))
            table[[p for p in wanted if p < subject_pos[0]]] = p_corrupted
            whole = []  # restorations that recompute the whole sequence
            for token in traced:
                if token not in suffixes:
                    suffixes[token] = runs.suffix(token) if reuse_prefix else None
                todo = [runs.restoration(token, layer, window) for layer in range(n_layers)]
                if suffixes[token] is None:
                    whole += todo
                    continue
                table[token] = torch.tensor(runs.run(todo, suffixes[token]))
                steps.update()
            if whole:
                for r, p in zip(whole, runs.run(whole, None)):
                    table[r.token, r.layer] = p
                steps.update(len(whole) // n_layers)
            restored[kind] = table
        steps.close()

    return TraceResult(
        prompt=prompt,
        subject=subject,
        answer=answer,
        answer_token=answer_token,
        tokens=[lm.tokenizer.decode([i]) for i in ids],
        subject_positions=subject_pos,
        p_clean=p_clean,
        p_corrupted=p_corrupted,
        noise=sigma,
        samples=samples,
        window=window,
        restored=restored,
        model=lm.name,
        fingerprint=lm.fingerprint,
        precision=precision,
        seconds=time.perf_counter() - started,
    )


def _add_noise(draws: torch.Tensor, positions: Sequence[int]):
    """A tap's ``replace`` function for the embeddings: row ``i`` gets ``draws[i]`` (tokens, d)
    added at the subject's ``positions``."""

    def fn(embedded: torch.Tensor) -> torch.Tensor:
        out = embedded.clone()
        out[:, list(positions)] += draws.to(device=out.device, dtype=out.dtype)
        return out

    return fn
