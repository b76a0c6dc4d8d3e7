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
corrupted forward pass at the first restored layer (:mod:`lmscalpel.runtime.stream`) instead of
re-running the whole model; all (token, noise draw) rows of one layer run as one batch (chunked
to at most ``batch_tokens`` tokens); tokens before the subject are identical in the clean and
corrupted runs, so restoring them is a no-op that is not computed; and the LM head runs at the
last position only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lmscalpel.locate.noise import noise_level
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime.hooks import capture, edit_output, edit_outputs, replace_at_positions
from lmscalpel.runtime.stream import (
    ResidualStream,
    check_replay,
    final_logits,
    kv_cache,
    record_stream,
    run_layers,
)
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


def window_layers(center: int, window: int, num_layers: int) -> range:
    """The layers restored around ``center``: ``[center - window//2, center + ceil(window/2))``,
    clipped to the model (the paper's convention: a window of 1 is the layer itself)."""
    return range(max(0, center - window // 2), min(num_layers, center - (-window // 2)))


def noise_draws(samples: int, tokens: int, hidden: int, sigma: float, seed: int) -> torch.Tensor:
    """The Gaussian noise added to the subject's embeddings: (samples, tokens, hidden), drawn on
    the CPU from ``seed`` so that a trace repeats exactly on any device."""
    generator = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(samples, tokens, hidden, generator=generator)


@dataclass
class TraceResult:
    """Causal trace of one prompt.

    ``restored[kind]`` is a (tokens, layers) float tensor of P_restored(answer) when restoring
    that kind at (token, layer); NaN where a token was not traced. ``tokens`` are the decoded
    prompt tokens, ``subject_positions`` their indices that belong to the subject.
    """

    prompt: str
    subject: str
    answer: str
    answer_token: int
    tokens: list[str]
    subject_positions: list[int]
    p_clean: float
    p_corrupted: float
    noise: float
    samples: int
    window: int
    restored: dict[str, torch.Tensor] = field(default_factory=dict)
    model: str = ""
    fingerprint: str = ""
    precision: str = "float32"
    seconds: float = 0.0

    @property
    def kinds(self) -> list[str]:
        return list(self.restored)

    @property
    def num_layers(self) -> int:
        return next(iter(self.restored.values())).shape[1]

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """(tokens, layers) P_restored - P_corrupted."""
        return self.restored[kind] - self.p_corrupted

    def strongest(self, kind: str) -> tuple[int, int]:
        """(token, layer) of the largest indirect effect of ``kind``."""
        effect = torch.nan_to_num(self.indirect_effect(kind), nan=-float("inf"))
        token, layer = divmod(int(effect.argmax()), effect.shape[1])
        return token, layer

    def metadata(self) -> dict:
        """Everything but the arrays, as plain JSON types."""
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "answer_token": self.answer_token,
            "tokens": self.tokens,
            "subject_positions": self.subject_positions,
            "p_clean": self.p_clean,
            "p_corrupted": self.p_corrupted,
            "noise": self.noise,
            "samples": self.samples,
            "window": self.window,
            "kinds": self.kinds,
            "num_layers": self.num_layers,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "seconds": self.seconds,
        }

    def to_dict(self) -> dict:
        """Metadata plus, per kind, P_restored and the indirect effect as nested lists (NaN as
        ``null``)."""

        def rows(t: torch.Tensor) -> list[list[float | None]]:
            return [[None if v != v else round(v, 6) for v in row] for row in t.tolist()]

        data = self.metadata()
        data["restored"] = {k: rows(v) for k, v in self.restored.items()}
        data["indirect_effect"] = {k: rows(self.indirect_effect(k)) for k in self.restored}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TraceResult:
        def tensor(rows: list) -> torch.Tensor:
            return torch.tensor([[float("nan") if v is None else v for v in r] for r in rows])

        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["restored"] = {k: tensor(v) for k, v in data["restored"].items()}
        return cls(**fields)

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``trace.json`` (metadata and arrays) and ``trace.safetensors`` (the arrays:
        ``restored.<kind>`` and ``indirect_effect.<kind>``, each (tokens, layers))."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for kind, values in self.restored.items():
            tensors[f"restored.{kind}"] = values.contiguous()
            tensors[f"indirect_effect.{kind}"] = self.indirect_effect(kind).contiguous()
        meta = {"metadata": json.dumps(self.metadata())}
        save_file(tensors, folder / "trace.safetensors", metadata=meta)
        (folder / "trace.json").write_text(json.dumps(self.to_dict(), indent=1))
        return [folder / "trace.json", folder / "trace.safetensors"]

    @classmethod
    def load(cls, folder: str | Path) -> TraceResult:
        folder = Path(folder)
        meta = json.loads((folder / "trace.json").read_text())
        tensors = load_file(folder / "trace.safetensors")
        fields = {k: v for k, v in meta.items() if k in cls.__dataclass_fields__}
        fields["restored"] = {k: tensors[f"restored.{k}"] for k in meta["kinds"]}
        return cls(**fields)


def _check_kinds(kinds: Iterable[str] | str) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise TracingError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return list(dict.fromkeys(kinds))


def _module_names(lm: LoadedModel, kind: str) -> list[str]:
    a = lm.adapter
    name = a.mlp_name if kind == "mlp" else a.attn_name
    return [name(layer) for layer in range(a.num_layers)]


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
        extra = [name for kind in kinds if kind != "hidden" for name in _module_names(lm, kind)]
        with capture(lm.model, extra) as clean_out:
            clean = record_stream(lm, input_ids, keep_kv=True)
        check_replay(lm, clean, atol=REPLAY_TOLERANCE[precision])
        clean_probs = torch.softmax(clean.logits[0].float(), dim=-1)
        if answer_token is None:
            answer_token = int(clean_probs.argmax())
            answer = lm.tokenizer.decode([answer_token])
        p_clean = float(clean_probs[answer_token])

        # Corrupted run: the same noise draws serve every restoration.
        draws = noise_draws(samples, len(subject_pos), a.hidden_size, sigma, seed)
        with edit_output(lm.model, a.spec.embeddings, _add_noise(draws, subject_pos)):
            corrupted = record_stream(lm, input_ids.expand(samples, -1), keep_kv=True)
        p_corrupted = float(torch.softmax(corrupted.logits.float(), -1)[:, answer_token].mean())

        restored = {}
        suffixes: dict[int, ResidualStream | None] = {}
        steps = tqdm(
            total=len(kinds) * len(traced), desc="tracing", disable=not progress, leave=False
        )
        for kind in kinds:
            runs = _Runs(
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
    """An ``edit_output`` function for the embeddings: row ``i`` gets ``draws[i]`` (tokens, d)
    added at the subject's ``positions``."""

    def fn(embedded: torch.Tensor) -> torch.Tensor:
        out = embedded.clone()
        out[:, list(positions)] += draws.to(device=out.device, dtype=out.dtype)
        return out

    return fn


@dataclass(frozen=True)
class _Restoration:
    """One restoration: ``kind`` at ``token``, ``layer``; recomputed from layer ``start`` up,
    with the module outputs of the ``patched`` layers restored (mlp/attn)."""

    token: int
    layer: int
    start: int
    patched: range


class _Runs:
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
        self.names = _module_names(lm, kind) if kind != "hidden" else []

    def restoration(self, token: int, layer: int, window: int) -> _Restoration:
        if self.kind == "hidden":  # the state after `layer` is the input of layer + 1
            return _Restoration(token, layer, layer + 1, range(0))
        patched = window_layers(layer, window, self.lm.adapter.num_layers)
        return _Restoration(token, layer, patched.start, patched)

    def suffix(self, token: int) -> ResidualStream | None:
        """The clean stream of tokens ``token..`` after the cached prefix, or ``None`` to
        recompute the whole sequence."""
        if token == 0 or self.clean.kv is None or self.corrupted.kv is None:
            return None
        prefix = [(k[:, :, :token], v[:, :, :token]) for k, v in self.clean.kv]
        try:
            stream = record_stream(self.lm, self.input_ids[:, token:], past=prefix)
            check_replay(
                self.lm, stream, past=kv_cache(self.lm, prefix), atol=self.replay_tolerance
            )
        except (RuntimeError, ValueError) as error:
            log.debug("recomputing whole sequences for token %d: %s", token, error)
            return None
        return stream

    def run(
        self, restorations: Sequence[_Restoration], suffix: ResidualStream | None
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
        self, group: list[_Restoration], suffix: ResidualStream | None, offset: int
    ) -> list[float]:
        lm, n = self.lm, self.samples
        n_layers = lm.adapter.num_layers
        stream = self.clean if suffix is None else suffix
        hidden: torch.Tensor | None = None  # (samples, active restorations, width, d)
        active: list[_Restoration] = []
        for layer in range(group[0].start, n_layers + 1):
            joining = [r for r in group if r.start == layer]
            if joining:
                hidden = self._join(hidden, joining, offset)
                active += joining
            if layer == n_layers:
                break
            g = len(active)
            edits = {}
            restored_here = [i for i, r in enumerate(active) if layer in r.patched]
            if restored_here:
                name = self.names[layer]
                tokens = [active[i].token for i in restored_here]
                values = self.clean_out[name].output[0, tokens].repeat(n, 1)
                rows = [s * g + i for s in range(n) for i in restored_here]
                positions = [t - offset for t in tokens] * n
                edits[name] = replace_at_positions(values, positions, rows)
            past = None
            if suffix is not None:
                keys, vals = self.corrupted.kv[layer]
                prefix = [x[:, None, :, :offset].expand(-1, g, -1, -1, -1) for x in (keys, vals)]
                past = kv_cache(lm, {layer: tuple(x.reshape(n * g, *x.shape[2:]) for x in prefix)})
            rows_in = hidden.reshape(n * g, *hidden.shape[2:])
            with edit_outputs(lm.model, edits):
                out = run_layers(lm, stream, rows_in, layer, layer + 1, past=past)
            hidden = out.view(n, g, *out.shape[1:])
        logits = final_logits(lm, hidden[:, :, -1]).float()  # (samples, restorations, vocab)
        mean = torch.softmax(logits, dim=-1)[..., self.answer_token].mean(dim=0)
        by_restoration = dict(zip(active, mean.tolist()))
        return [by_restoration[r] for r in group]

    def _join(
        self, hidden: torch.Tensor | None, joining: list[_Restoration], offset: int
    ) -> torch.Tensor:
        """``hidden`` with the rows of restorations that start at this layer appended."""
        layer = joining[0].start
        base = self.corrupted.states[layer][:, offset:]  # (samples, width, d)
        new = base[:, None].repeat(1, len(joining), 1, 1)
        if self.kind == "hidden":
            for i, r in enumerate(joining):
                new[:, i, r.token - offset] = self.clean.states[layer][0, r.token]
        return new if hidden is None else torch.cat([hidden, new], dim=1)
