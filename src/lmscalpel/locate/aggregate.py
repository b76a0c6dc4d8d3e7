"""Causal tracing over many facts: where, on average, does a model recall what it knows?

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (Section 2.2, Figure 2)
trace 1,000 facts GPT-2 XL knows and average the indirect effects by token class and layer; the
MLP effect at the last subject token peaks in the middle layers, and that is where ROME edits.
Here the facts are those of ``known_1000.json`` that *this* model gets right (its top-1 next token
is the attribute's first token, case-insensitive); the layer where the average MLP effect at the
last subject token peaks is where ROME would edit this model. It becomes ROME's default layer only
when recorded on request (:func:`lmscalpel.mechanics.peaks.record_peak`, ``lmscalpel trace
--known ... --record-peak``); tracing itself writes nothing outside its output folder.

Each traced fact is appended to ``facts.jsonl`` in the output folder as soon as it is done, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lmscalpel.locate.noise import noise_level
from lmscalpel.locate.result import TraceResult
from lmscalpel.locate.tracing import DEFAULT_SAMPLES, KINDS, TracingError, default_window, trace
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.scoring import next_token_logprobs
from lmscalpel.tokens import (
    SubjectNotFoundError,
    encode_prompt,
    encode_target,
    subject_token_positions,
)

log = logging.getLogger(__name__)

TOKEN_CLASSES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
"""The paper's token classes (Figure 2)."""

TOKEN_SETS = ("last-subject", "classes", "all")
"""Which tokens an aggregate traces: the last subject token only (the curve that names the edit
layer); one token of each single-token class (first and last subject token, first subsequent
token, last token); or every token from the subject on (all six classes)."""


@dataclass(frozen=True)
class KnownFact:
    """One record of ``known_1000.json``: ``prompt`` contains ``subject``, the model should
    continue it with ``attribute``."""

    known_id: int
    prompt: str
    subject: str
    attribute: str
    relation_id: str = ""


def load_knowns(path: str | os.PathLike) -> list[KnownFact]:
    """Known facts from a JSON list of records with ``prompt``, ``subject`` and ``attribute``."""
    records = json.loads(Path(path).read_text())
    return [
        KnownFact(
            known_id=int(r.get("known_id", i)),
            prompt=r["prompt"],
            subject=r["subject"],
            attribute=r["attribute"],
            relation_id=r.get("relation_id", ""),
        )
        for i, r in enumerate(records)
    ]


def model_knows(lm: LoadedModel, facts: Sequence[KnownFact], batch_size: int = 32) -> list[bool]:
    """Whether the model's top-1 next token after each prompt is the first token of its
    attribute (compared as text, stripped, case-insensitive; a leading token that is only white
    space, as some tokenizers emit before a word, is skipped)."""
    if not facts:
        return []
    top = next_token_logprobs(lm, [f.prompt for f in facts], batch_size=batch_size).argmax(-1)
    known = []
    for fact, token in zip(facts, top.tolist()):
        pieces = [
            lm.tokenizer.decode([t]).strip().lower()
            for t in (encode_target(lm, fact.prompt, fact.attribute) if fact.attribute else [])
        ]
        want = next((piece for piece in pieces if piece), "")
        got = lm.tokenizer.decode([token]).strip().lower()
        known.append(bool(want) and got == want)
    return known


def token_classes(n_tokens: int, subject_positions: Sequence[int]) -> dict[str, list[int]]:
    """Token indices of each of :data:`TOKEN_CLASSES` in a prompt of ``n_tokens`` tokens.

    The last token is always "last token", and is also "last subject token" when the subject ends
    the prompt; a one-token subject is both first and last subject token.
    """
    first, last = subject_positions[0], subject_positions[-1]
    end = n_tokens - 1
    return {
        "first subject token": [first],
        "middle subject tokens": list(range(first + 1, last)),
        "last subject token": [last],
        "first subsequent token": [last + 1] if last + 1 < end else [],
        "further tokens": list(range(last + 2, end)),
        "last token": [end],
    }


def traced_positions(n_tokens: int, subject_positions: Sequence[int], tokens: str) -> list[int]:
    """The token indices an aggregate traces under ``tokens`` (one of :data:`TOKEN_SETS`)."""
    classes = token_classes(n_tokens, subject_positions)
    if tokens == "last-subject":
        return classes["last subject token"]
    if tokens == "classes":
        names = ("first subject token", "last subject token", "first subsequent token")
        return sorted({p for name in (*names, "last token") for p in classes[name]})
    if tokens == "all":
        return list(range(subject_positions[0], n_tokens))
    raise TracingError(f"tokens must be one of {', '.join(TOKEN_SETS)}, got {tokens!r}")


def class_effects(result: TraceResult, kind: str) -> dict[str, list[float] | None]:
    """Per token class, the mean indirect effect over its traced tokens, per layer (``None`` for
    a class with no traced token)."""
    effect = result.indirect_effect(kind)
    out: dict[str, list[float] | None] = {}
    for name, positions in token_classes(len(result.tokens), result.subject_positions).items():
        rows = effect[positions] if positions else effect[:0]
        rows = rows[~rows.isnan().any(dim=1)]
        out[name] = rows.mean(dim=0).tolist() if len(rows) else None
    return out


@dataclass
class AggregateSettings:
    kinds: tuple[str, ...]
    samples: int
    window: int
    noise: float
    tokens: str
    seed: int
    precision: str

    def key(self, lm: LoadedModel) -> str:
        return json.dumps([lm.fingerprint, *self.__dict__.values()])


def aggregate(
    lm: LoadedModel,
    facts: Sequence[KnownFact],
    *,
    n: int = 100,
    kinds: Iterable[str] = KINDS,
    samples: int = DEFAULT_SAMPLES,
    window: int | None = None,
    noise: float | None = None,
    tokens: str = "last-subject",
    seed: int = 0,
    precision: str = "float32",
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Trace the first ``n`` of ``facts`` that the model knows and average their effects.

    Returns the summary (also written to ``out_dir/summary.json`` when ``out_dir`` is given):
    per kind the mean and standard error over facts of the indirect effect at the last subject
    token per layer, per kind and token class the mean effect per layer, and ``mlp_peak_layer``,
    the layer where the mean MLP effect at the last subject token is largest (with the share of
    bootstrap resamples of the facts that pick each layer, to show how settled it is).
    """
    kinds = tuple(dict.fromkeys(kinds))
    settings = AggregateSettings(
        kinds=kinds,
        samples=samples,
        window=default_window(lm.adapter.num_layers) if window is None else window,
        noise=noise_level(lm) if noise is None else float(noise),
        tokens=tokens,
        seed=seed,
        precision=precision,
    )
    traced_positions(3, [0], tokens)  # validates `tokens` before any work
    if n < 1:
        raise TracingError(f"n must be >= 1, got {n}")
    results: dict[int, TraceResult] = {}
    log_path = Path(out_dir) / "facts.jsonl" if out_dir is not None else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        results = _load_done(log_path, settings.key(lm))
        if results:
            log.info("resuming: %d facts already traced in %s", len(results), log_path)

    started = time.perf_counter()
    checked = known_count = 0
    bar = tqdm(total=n, desc="tracing known facts", disable=not progress)
    bar.update(min(n, len(results)))
    chosen: list[int] = []
    for lo in range(0, len(facts), 64):
        if len(chosen) >= n:
            break
        batch = facts[lo : lo + 64]
        knows = model_knows(lm, batch)
        for fact, ok in zip(batch, knows):
            if len(chosen) >= n:
                break
            checked += 1
            if not ok:
                continue
            known_count += 1
            if fact.known_id in results:
                chosen.append(fact.known_id)
                continue
            try:
                subject_pos = subject_token_positions(lm, fact.prompt, fact.subject)
            except SubjectNotFoundError:
                log.warning("skipping fact %d: subject not in prompt", fact.known_id)
                continue
            n_tokens = len(encode_prompt(lm, fact.prompt))
            result = trace(
                lm,
                fact.prompt,
                fact.subject,
                fact.attribute,
                kinds=kinds,
                samples=samples,
                noise=settings.noise,
                window=settings.window,
                positions=traced_positions(n_tokens, subject_pos, tokens),
                seed=seed,
                precision=precision,
            )
            results[fact.known_id] = result
            chosen.append(fact.known_id)
            if log_path is not None:
                line = {"known_id": fact.known_id, "settings": settings.key(lm)}
                line["trace"] = result.to_dict()
                with log_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
            bar.update()
    bar.close()
    traced = [results[k] for k in chosen]
    if not traced:
        raise TracingError(f"the model knows none of the {checked} facts checked")
    summary = summarize(lm, traced, settings)
    summary.update(
        facts_checked=checked,
        facts_known=known_count,
        share_known=known_count / checked if checked else 0.0,
        known_ids=chosen,
        seconds=time.perf_counter() - started,
        seconds_per_fact=sum(r.seconds for r in traced) / len(traced),
    )
    if out_dir is not None:
        (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _load_done(path: Path, key: str) -> dict[int, TraceResult]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("settings") == key:
                done[int(record["known_id"])] = TraceResult.from_dict(record["trace"])
    return done


def summarize(
    lm: LoadedModel,
    traced: Sequence[TraceResult],
    settings: AggregateSettings,
    *,
    bootstrap: int = 1000,
) -> dict:
    """Average the traces: see :func:`aggregate`'s return value."""
    last_subject: dict[str, dict[str, list[float]]] = {}
    classes: dict[str, dict[str, list[float] | None]] = {}
    counts: dict[str, int] = {}
    curves: dict[str, torch.Tensor] = {}
    for kind in settings.kinds:
        per_fact = [class_effects(r, kind) for r in traced]
        curve = torch.tensor([f["last subject token"] for f in per_fact], dtype=torch.float64)
        curves[kind] = curve  # (facts, layers)
        stderr = curve.std(dim=0) / len(curve) ** 0.5 if len(curve) > 1 else curve[0] * 0
        last_subject[kind] = {"mean": curve.mean(0).tolist(), "stderr": stderr.tolist()}
        classes[kind] = {}
        for name in TOKEN_CLASSES:
            rows = [f[name] for f in per_fact if f[name] is not None]
            counts[name] = len(rows)
            classes[kind][name] = torch.tensor(rows).mean(0).tolist() if rows else None
    summary: dict = {
        "model": lm.name,
        "fingerprint": lm.fingerprint,
        "num_layers": lm.adapter.num_layers,
        "facts_traced": len(traced),
        "kinds": list(settings.kinds),
        "samples": settings.samples,
        "window": settings.window,
        "noise": settings.noise,
        "tokens": settings.tokens,
        "seed": settings.seed,
        "precision": settings.precision,
        "p_clean_mean": sum(r.p_clean for r in traced) / len(traced),
        "p_corrupted_mean": sum(r.p_corrupted for r in traced) / len(traced),
        "last_subject_token": last_subject,
        "token_classes": classes,
        "token_class_counts": counts,
    }
    if "mlp" in curves:
        mlp = curves["mlp"]
        peak = int(mlp.mean(0).argmax())
        generator = torch.Generator().manual_seed(0)
        picks = torch.randint(len(mlp), (bootstrap, len(mlp)), generator=generator)
        peaks = mlp[picks].mean(dim=1).argmax(dim=1)
        shares = torch.bincount(peaks, minlength=mlp.shape[1]).double() / bootstrap
        summary["mlp_peak_layer"] = peak
        summary["mlp_peak_effect"] = float(mlp.mean(0)[peak])
        summary["mlp_peak_bootstrap"] = {
            str(layer): round(float(share), 3) for layer, share in enumerate(shares) if share > 0
        }
    if "hidden" in curves:
        summary["hidden_peak_layer"] = int(curves["hidden"].mean(0).argmax())
    if "attn" in curves:
        summary["attn_peak_layer"] = int(curves["attn"].mean(0).argmax())
    return summary


@dataclass(frozen=True)
class KindPeak:
    """Where one kind's mean indirect effect at the last subject token peaks in an aggregate:
    the ``layer``, the ``effect`` there, and the mean effect at the prompt's last token at the
    same layer (``None`` when the last token was not traced)."""

    kind: str
    layer: int
    effect: float
    last_token_effect: float | None


def kind_peaks(summary: dict) -> list[KindPeak]:
    """Per traced kind of an :func:`aggregate` summary, its peak (see :class:`KindPeak`)."""
    peaks = []
    for kind, curve in summary["last_subject_token"].items():
        mean = curve["mean"]
        layer = summary[f"{kind}_peak_layer"]
        last = summary["token_classes"][kind]["last token"]
        peaks.append(KindPeak(kind, layer, mean[layer], None if last is None else last[layer]))
    return peaks
