"""Second-moment statistics of MLP keys, C = E[k kᵀ], accumulated in a stream and cached.

ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", eq. 2) writes a new
fact with the rank-one update that disturbs other keys least *on average*, which takes the
uncentered covariance C of the keys k — the inputs of the edited MLP output matrix — over text the
model reads. MEMIT and AlphaEdit need the same matrix. Here it is computed once per (model, layer,
corpus, sample count), with only the layers up to the edited one running, and cached as
safetensors under ``$LMSCALPEL_HOME/stats/<fingerprint>/``. AlphaEdit's null-space projections
come from the eigendecomposition of C (:meth:`KeyStatistics.spectrum`), computed once per
statistics file and cached beside it (``….spectrum.safetensors``).

Corpora (:func:`resolve_corpus`):

* ``"model"`` (the default, no network, no files): text sampled from the model itself, generated
  once per model and cached. docs/rome.md shows the measurement behind this default.
* a ``.txt`` file (blank lines separate documents), a ``.jsonl`` file (one object per line with a
  ``"text"`` field, as ``datasets.Dataset.to_json`` writes), a ``.json`` list of strings or such
  objects, or a folder of these;
* a Hugging Face dataset on this machine (:class:`HFDatasetCorpus`, the ``hf`` extra): a folder
  written by ``save_to_disk``, or ``hf:NAME[:CONFIG][@SPLIT]`` from the local datasets cache
  (downloads are switched off), its ``text`` column.

Under a launch of several processes (``torchrun``; :mod:`lmscalpel.runtime.distributed`) the
statistics are accumulated data-parallel over exactly the tokens one process would take: rank 0
lists the rows up to the ``samples``-th token (the last row cut there) and hands the list to every
rank, each rank streams every ``world``-th row, and the float64 sums and the counts are added up
over the ranks; rank 0 writes the cache file while the others wait. For the ``"model"`` corpus the
ranks first sample the chunks the statistics need at least, each its own share (chunk ``i`` on
rank ``i mod world``, one cache file each: no two ranks write the same file); the rare extra chunk
(when sampled text ended early) is sampled by rank 0 while it lists the rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from lmscalpel.core.cache import TENSORS, DiskCache, TensorFile, tensor_codec
from lmscalpel.core.config import ConfigError
from lmscalpel.models.adapter import module_of
from lmscalpel.models.fingerprint import tensor_digest
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.runtime import distributed
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.runtime.kv import run_body
from lmscalpel.scoring import pad_token_id, right_padded

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "model"
DEFAULT_SAMPLES = 20_000
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")

CORPORA = DiskCache("corpora", TENSORS)
"""Text sampled from a model: ``corpora/<fingerprint>/<corpus>-<chunk>.safetensors``."""


# ---- the accumulator (pure) ------------------------------------------------------------------
class SecondMoment:
    """Streaming E[k kᵀ] in float64: ``add`` batches of keys (n, d), read ``moment()`` (d, d)."""

    def __init__(self, dim: int) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def add(self, keys: torch.Tensor) -> None:
        keys = keys.detach().reshape(-1, self.sum.shape[0]).to("cpu", torch.float64)
        self.sum.addmm_(keys.T, keys)
        self.count += keys.shape[0]

    def moment(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no keys were added")
        return self.sum / self.count

    def reduce_over_ranks(self) -> None:
        """Replace this process's sum and count by their totals over all processes (collective;
        nothing to do in a lone process)."""
        distributed.all_reduce_sum(self.sum)
        count = torch.tensor([self.count], dtype=torch.int64)
        self.count = int(distributed.all_reduce_sum(count).item())


# ---- corpora ---------------------------------------------------------------------------------
class Corpus(Protocol):
    """Where statistics' text comes from: a stable ``id`` (part of the cache key) and token rows."""

    id: str

    def rows(self, lm: LoadedModel, max_length: int) -> Iterator[list[int]]:
        """Token id rows of at most ``max_length`` tokens, in a fixed order."""
        ...


def _documents(path: Path) -> Iterator[str]:
    """The texts in one file (see the module docstring for the formats)."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from (doc.strip() for doc in text.split("\n\n") if doc.strip())
        return
    if path.suffix == ".jsonl":
        items = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
    else:
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ConfigError(f"{path}: a .json corpus must hold a list of strings or objects")
    for i, item in enumerate(items):
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ConfigError(f"{path}: item {i} has no string 'text' field")
        if text.strip():
            yield text


@dataclass
class TextCorpus:
    """Text files (or folders of them); ``id`` is a digest of their contents."""

    paths: list[Path]
    id: str = field(init=False)

    def __post_init__(self) -> None:
        files: list[Path] = []
        for path in self.paths:
            if path.is_dir():
                files += sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
            elif path.is_file() and path.suffix in TEXT_SUFFIXES:
                files.append(path)
            else:
                raise ConfigError(
                    f"corpus {path} is not a {'/'.join(TEXT_SUFFIXES)} file or a folder of them"
                )
        if not files:
            raise ConfigError(f"no {'/'.join(TEXT_SUFFIXES)} files in {self.paths}")
        self.files = files
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        stem = files[0].stem if len(files) == 1 else files[0].parent.name
        self.id = (
            f"{''.join(c if c.isalnum() else '_' for c in stem)[:40]}-{digest.hexdigest()[:12]}"
        )

    def rows(self, lm: LoadedModel, max_length: int) -> Iterator[list[int]]:
        for path in self.files:
            yield from _token_rows(lm, _documents(path), max_length)


def _token_rows(lm: LoadedModel, documents: Iterable[str], max_length: int) -> Iterator[list[int]]:
    """Each document tokenised and cut into rows of at most ``max_length`` tokens."""
    for doc in documents:
        ids = lm.tokenizer(doc, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), max_length):
            if len(ids) - start > 1:
                yield ids[start : start + max_length]


@dataclass
class HFDatasetCorpus:
    """A Hugging Face dataset already on this machine (needs the ``datasets`` package, the
    ``hf`` extra): a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``,
    or ``hf:NAME[:CONFIG][@SPLIT]`` read from the local datasets cache with downloads switched
    off. Documents are the ``text_field`` column of ``split``, in order."""

    source: str
    split: str = "train"
    text_field: str = "text"
    config: str | None = None
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.dataset = self._load()
        if self.text_field not in self.dataset.column_names:
            raise ConfigError(
                f"dataset {self.source!r} has no {self.text_field!r} column "
                f"(columns: {', '.join(self.dataset.column_names)})"
            )
        folder = Path(self.source)
        if folder.is_dir():  # the saved metadata holds the content fingerprint
            digest = hashlib.sha256(self.split.encode())
            for meta in sorted(folder.rglob("state.json")):
                digest.update(meta.read_bytes())
            stem, tag = folder.name, digest.hexdigest()[:12]
        else:
            stem, tag = f"{self.source}-{self.config}-{self.split}", self.dataset._fingerprint[:12]
        self.id = f"hf_{''.join(c if c.isalnum() else '_' for c in stem)[:40]}-{tag}"

    def _load(self):
        try:
            import datasets
        except ImportError:
            raise ConfigError(
                f"corpus {self.source!r} is a Hugging Face dataset, which needs the `datasets` "
                "package: pip install 'lmscalpel[hf]' (or pass a .txt/.jsonl/.json corpus)"
            ) from None
        if Path(self.source).is_dir():
            loaded = datasets.load_from_disk(self.source)
            if isinstance(loaded, datasets.DatasetDict):
                if self.split not in loaded:
                    raise ConfigError(
                        f"{self.source} has splits {', '.join(loaded)}, not {self.split!r}"
                    )
                loaded = loaded[self.split]
            return loaded
        # the environment only counts before the first import: switch the flags themselves off
        flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
        saved = [(module, name, getattr(module, name)) for module, name in flags]
        try:
            for module, name in flags:
                setattr(module, name, True)
            return datasets.load_dataset(self.source, self.config, split=self.split)
        except Exception as error:  # datasets raises many kinds when offline and not cached
            raise ConfigError(
                f"Hugging Face dataset {self.source!r} (config {self.config}, split "
                f"{self.split}) is not in the local cache and lmscalpel never downloads at run "
                f"time: load it once with network access, or save it with save_to_disk and pass "
                f"the folder ({type(error).__name__}: {str(error)[:200]})"
            ) from None
        finally:
            for module, name, value in saved:
                setattr(module, name, value)

    def rows(self, lm: LoadedModel, max_length: int) -> Iterator[list[int]]:
        texts = (text for text in self.dataset[self.text_field] if text and text.strip())
        yield from _token_rows(lm, texts, max_length)


@dataclass
class SampledCorpus:
    """Text the model writes itself: sequences sampled at temperature 1 from its start token.

    Generated in chunks of ``chunk`` sequences (chunk ``i`` with seed ``seed + i``, so a larger
    request extends a smaller one), cached per model under ``$LMSCALPEL_HOME/corpora``. The start
    token itself is not part of the rows.
    """

    seed: int = 0
    length: int = 128
    chunk: int = 32
    top_k: int = 0
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = f"model-s{self.seed}-l{self.length}" + (f"-k{self.top_k}" if self.top_k else "")

    def _chunk(self, lm: LoadedModel, index: int) -> torch.Tensor:
        key = (lm.fingerprint, f"{self.id}-{index}")
        stored = CORPORA.get(
            key, lambda: self._sample(lm, index), check=lambda f: "tokens" in f.tensors
        )
        return stored["tokens"].long()

    def _sample(self, lm: LoadedModel, index: int) -> TensorFile:
        log.info(
            "sampling %d x %d tokens of text from %s for statistics (chunk %d, cached in %s)",
            self.chunk,
            self.length,
            lm.name,
            index,
            CORPORA.path((lm.fingerprint, self.id)).parent,
        )
        tok = lm.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ConfigError(f"{lm.name}: its tokenizer has no BOS or EOS token to sample from")
        config = GenerationConfig(
            max_new_tokens=self.length,
            min_new_tokens=self.length,
            do_sample=True,
            top_k=self.top_k or None,
            top_p=None,
            temperature=1.0,
            pad_token_id=pad_token_id(lm),
            eos_token_id=None,
        )
        ids = torch.full((self.chunk, 1), start, dtype=torch.long, device=lm.device)
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(self.seed + index)
            out = lm.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        return TensorFile({"tokens": out[:, 1:].to("cpu", torch.int32).contiguous()})

    def chunks_needed(self, samples: int) -> int:
        """The chunks ``samples`` tokens take at least (a chunk holds at most ``chunk`` ·
        ``length`` of them; fewer when a sampled special token ends a sequence early)."""
        return math.ceil(samples / (self.chunk * self.length))

    def sample_chunks(self, lm: LoadedModel, indices: Iterable[int]) -> None:
        """Sample (and cache) the chunks ``indices`` that are not cached yet."""
        for index in indices:
            self._chunk(lm, index)

    def rows(self, lm: LoadedModel, max_length: int) -> Iterator[list[int]]:
        special = set(lm.tokenizer.all_special_ids)
        index = 0
        while True:
            for seq in self._chunk(lm, index).tolist():
                # A sampled special token (end of text, a chat turn) ends the document.
                cut = next((i for i, t in enumerate(seq) if t in special), len(seq))
                for start in range(0, cut, max_length):
                    if cut - start > 1:
                        yield seq[start : min(cut, start + max_length)]
            index += 1


def resolve_corpus(spec: str | os.PathLike | Corpus | None) -> Corpus:
    """A corpus from a spec: ``"model"`` (or ``None``), a path, or a ready :class:`Corpus`."""
    if spec is None or spec == "model":
        return SampledCorpus()
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if isinstance(spec, str) and spec.startswith("hf:"):
        name, _, split = spec[3:].partition("@")
        name, _, config = name.partition(":")
        return HFDatasetCorpus(name, split=split or "train", config=config or None)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(
            f"statistics corpus {str(spec)!r} not found: use 'model' (text sampled from the model "
            f"itself), a {'/'.join(TEXT_SUFFIXES)} file, a folder of such files, a dataset folder "
            "written by save_to_disk, or hf:NAME[:CONFIG][@SPLIT] from the local datasets cache"
        )
    if path.is_dir() and any(path.rglob("dataset_info.json")):
        return HFDatasetCorpus(str(path))
    return TextCorpus([path])


# ---- statistics ------------------------------------------------------------------------------
@dataclass
class KeyStatistics:
    """C = E[k kᵀ] (d, d) of the inputs k of one weight matrix (by default a layer's MLP output
    matrix: its keys), from ``count`` tokens."""

    moment: torch.Tensor
    count: int
    layer: int
    corpus: str
    path: Path | None = None
    weight: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    _cholesky: torch.Tensor | None = field(default=None, repr=False)
    _spectrum: Spectrum | None = field(default=None, repr=False)
    _projections: dict[float, torch.Tensor] = field(default_factory=dict, repr=False)  # bases

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        """C⁻¹ k for keys (d,) or (n, d), in float64 (C is factorised once)."""
        if self._cholesky is None:
            moment = self.moment.double()
            factor, info = torch.linalg.cholesky_ex(moment)
            if info.item() != 0:  # singular C (too few keys): a whisper of ridge makes it definite
                ridge = 1e-6 * moment.diagonal().mean()
                factor = torch.linalg.cholesky(moment + ridge * torch.eye(len(moment)))
                log.warning("statistics of layer %d are singular; added a ridge", self.layer)
            self._cholesky = factor
        vectors = keys.double().reshape(-1, self.moment.shape[0]).T
        solved = torch.cholesky_solve(vectors.to(self._cholesky.device), self._cholesky).T
        return solved.reshape(keys.shape)

    def spectrum(self) -> Spectrum:
        """The eigendecomposition of C, eigenvalues ascending (float64): computed once, kept
        with these statistics and, when they come from the cache, on disk beside them."""
        if self._spectrum is None:
            digest = tensor_digest(self.moment)
            if self.path is None:
                self._spectrum = Spectrum.of(self.moment, digest)
            else:
                key = (
                    self.path.parent.name,
                    self.path.name.removesuffix(".safetensors") + ".spectrum",
                )
                self._spectrum = SPECTRA.get(
                    key,
                    lambda: Spectrum.of(self.moment, digest),
                    check=lambda found: found.moment_sha256 == digest,
                )
        return self._spectrum

    def null_space_basis(self, energy: float) -> torch.Tensor:
        """U (d, r), float64, orthonormal columns: C's eigenvectors with the smallest eigenvalues
        that together hold at most ``energy`` of E[‖k‖²] = tr C — the directions the keys of the
        statistics' text (almost) never take (AlphaEdit's null space of the preserved keys; Fang
        et al. 2025, §3.1). r may be 0. Cached per ``energy``."""
        if not 0.0 <= energy < 1.0:
            raise ConfigError(
                f"the null space's share of the key energy must be in [0, 1), got {energy}"
            )
        if energy not in self._projections:
            self._projections[energy] = self.spectrum().null_basis(energy)
        return self._projections[energy]

    def null_space_projection(self, energy: float) -> torch.Tensor:
        """P = UUᵀ (d, d), float64: the orthogonal projection onto :meth:`null_space_basis`. An
        update ΔP leaves every key k with Pk = 0 unchanged, and the statistics' own keys change
        by at most √energy of their typical size."""
        basis = self.null_space_basis(energy)
        return basis @ basis.T

    def null_space_energy(self, energy: float) -> float:
        """E[‖Pk‖²] = tr(PC): the keys' energy in :meth:`null_space_basis` (at most ``energy``
        · tr C)."""
        rank = self.null_space_basis(energy).shape[1]
        return float(self.spectrum().eigenvalues[:rank].clamp(min=0.0).sum())


@dataclass
class Spectrum:
    """C = V diag(λ) Vᵀ: ``eigenvalues`` (d,) ascending and ``eigenvectors`` (d, d) as columns,
    float64, of the moment whose digest is ``moment_sha256``."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    moment_sha256: str

    @classmethod
    def of(cls, moment: torch.Tensor, digest: str) -> Spectrum:
        values, vectors = torch.linalg.eigh(moment.double())
        return cls(values, vectors, digest)

    def null_basis(self, energy: float) -> torch.Tensor:
        """(d, r): the eigenvectors with the smallest eigenvalues whose sum is at most
        ``energy`` · tr C (r may be 0)."""
        values = self.eigenvalues.clamp(min=0.0)
        share = values.cumsum(0) / values.sum().clamp(min=1e-300)
        count = int((share <= energy).sum())
        return self.eigenvectors[:, :count]


def _encode(stats: KeyStatistics) -> TensorFile:
    return TensorFile({"moment": stats.moment}, stats.metadata)


def _decode(stored: TensorFile, path: Path) -> KeyStatistics:
    meta = stored.metadata
    moment = stored["moment"]
    if moment.dim() != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"moment of shape {tuple(moment.shape)} is not square")
    count, layer = int(meta["count"]), int(meta["layer"])
    return KeyStatistics(moment, count, layer, meta["corpus"], path, meta["weight"], meta)


def _encode_spectrum(spectrum: Spectrum) -> TensorFile:
    tensors = {"eigenvalues": spectrum.eigenvalues, "eigenvectors": spectrum.eigenvectors}
    return TensorFile(tensors, {"moment_sha256": spectrum.moment_sha256})


def _decode_spectrum(stored: TensorFile, path: Path) -> Spectrum:
    values, vectors = stored["eigenvalues"].double(), stored["eigenvectors"].double()
    if values.dim() != 1 or vectors.shape != (len(values), len(values)):
        raise ValueError("eigenvalues and eigenvectors of mismatching shapes")
    return Spectrum(values, vectors, stored.metadata["moment_sha256"])


SPECTRA = DiskCache("stats", tensor_codec(_encode_spectrum, _decode_spectrum))
"""Eigendecompositions of cached statistics, beside them: ``stats/<fingerprint>/<weight>.<corpus>.
<samples>.spectrum.safetensors``, with the digest of the moment they decompose (a stale one, of a
recomputed moment, is recomputed)."""

STATISTICS = DiskCache("stats", tensor_codec(_encode, _decode))
"""Key statistics: ``stats/<fingerprint>/<weight>.<corpus>.<samples>.safetensors``, the moment
and, as metadata, its count, layer, weight, corpus, model and fingerprint."""


def statistics_key(lm: LoadedModel, weight: str, corpus_id: str, samples: int) -> tuple[str, str]:
    """The cache key of the statistics of ``weight``'s inputs over ``samples`` tokens of the corpus
    whose id is ``corpus_id``."""
    return (lm.fingerprint, f"{weight}.{corpus_id}.{samples}")


def _statistics_key(
    lm: LoadedModel, layer: int | str, corpus: Corpus, samples: int
) -> tuple[str, str]:
    weight = layer if isinstance(layer, str) else lm.adapter.mlp_out_weight_name(layer)
    return statistics_key(lm, weight, corpus.id, samples)


def statistics_path(lm: LoadedModel, layer: int | str, corpus: Corpus, samples: int) -> Path:
    """Where the statistics of (model, weight, corpus, sample count) are cached; ``layer``: the
    layer whose MLP output matrix's keys they are, or a weight's name."""
    return STATISTICS.path(_statistics_key(lm, layer, corpus, samples))


def key_statistics(
    lm: LoadedModel,
    layer: int,
    corpus: str | os.PathLike | Corpus | None = DEFAULT_CORPUS,
    samples: int = DEFAULT_SAMPLES,
    *,
    batch_size: int = 16,
    max_length: int = 128,
    progress: bool = True,
) -> KeyStatistics:
    """The second moment of layer ``layer``'s MLP keys over ``samples`` tokens of ``corpus``.

    Read from the cache when it is there (a hit costs milliseconds); otherwise streamed in batches
    with a progress bar — only the layers up to ``layer`` run — and cached.
    """
    weight = lm.adapter.mlp_out_weight_name(layer)
    found = input_statistics(
        lm,
        [weight],
        corpus,
        samples,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    return found[weight]


def input_statistics(
    lm: LoadedModel,
    weights: Sequence[str],
    corpus: str | os.PathLike | Corpus | None = DEFAULT_CORPUS,
    samples: int = DEFAULT_SAMPLES,
    *,
    batch_size: int = 16,
    max_length: int = 128,
    progress: bool = True,
) -> dict[str, KeyStatistics]:
    """The second moment of the inputs of each named weight matrix over ``samples`` tokens of
    ``corpus``: from the cache where it is there, the missing ones together in one streamed pass
    (up to the highest of their layers), then cached one file per weight.

    Collective under a launch of several processes (see the module docstring): every rank calls
    it, the ranks share the pass, and every rank returns the same statistics. The ranks must see
    the same cache (one machine, or a shared file system); a weight missing on any rank is
    computed by all."""
    if samples < 1:
        raise ConfigError(f"statistics need at least one sample, got {samples}")
    source = resolve_corpus(corpus)
    distributed.join(lm.device)
    shared = distributed.lockstep()
    found: dict[str, KeyStatistics] = {}
    for weight in weights:
        key = _statistics_key(lm, weight, source, samples)
        stored = STATISTICS.load(key)
        if stored is not None:
            found[weight] = stored
            log.debug("statistics cache hit: %s", STATISTICS.path(key))
    missing = [w for w in dict.fromkeys(weights) if w not in found]
    if shared:  # what any rank lacks, all compute (each must take part in the pass)
        anywhere = {w for lacking in distributed.all_gather(missing) for w in lacking}
        missing = [w for w in dict.fromkeys(weights) if w in anywhere]
    if not missing:
        return found
    log.info("computing input statistics of %s over %d tokens of %s", missing, samples, source.id)
    accumulators = _accumulate(
        lm, missing, source, samples, batch_size, max_length, progress, shared=shared
    )
    computed: dict[str, KeyStatistics] = {}
    for weight, accumulator in accumulators.items():
        if accumulator.count < samples:
            log.warning(
                "corpus %s holds only %d tokens (asked for %d)",
                source.id,
                accumulator.count,
                samples,
            )
        layer = lm.adapter.layer_of(weight)
        moment = accumulator.moment().float().contiguous()
        metadata = {
            "count": str(accumulator.count),
            "layer": str(layer),
            "weight": weight,
            "corpus": source.id,
            "model": lm.name,
            "fingerprint": lm.fingerprint,
            "max_length": str(max_length),
        }
        key = _statistics_key(lm, weight, source, samples)
        computed[weight] = KeyStatistics(
            moment, accumulator.count, layer, source.id, STATISTICS.path(key), weight, metadata
        )

    def save() -> None:
        for weight, statistics in computed.items():
            STATISTICS.save(_statistics_key(lm, weight, source, samples), statistics)

    if shared:  # one writer; the others wait until the files are whole
        distributed.on_rank_zero(save)
    else:
        save()
    found.update(computed)
    return found


def planned_rows(corpus: Corpus, lm: LoadedModel, samples: int, max_length: int) -> list[list[int]]:
    """The rows whose tokens :func:`_accumulate` takes, in order: whole rows up to the
    ``samples``-th token, the last one cut there (a causal model's keys of a row's first tokens
    do not depend on the tokens after them)."""
    plan: list[list[int]] = []
    count = 0
    for row in corpus.rows(lm, max_length):
        if count >= samples:
            break
        plan.append(row[: samples - count])
        count += len(plan[-1])
    return plan


def _accumulate(
    lm: LoadedModel,
    weights: Sequence[str],
    corpus: Corpus,
    samples: int,
    batch_size: int,
    max_length: int,
    progress: bool,
    *,
    shared: bool = False,
) -> dict[str, SecondMoment]:
    """The rows of :func:`planned_rows` streamed in batches. ``shared`` (collective, every rank
    calls it): rank 0 plans the rows, each rank streams its shard of them, and the sums and counts
    are added up over the ranks."""
    if not shared:
        pass_ = _Pass(lm, weights)
        pass_.stream(planned_rows(corpus, lm, samples, max_length), batch_size, progress)
        return pass_.accumulators
    if isinstance(corpus, SampledCorpus):  # each rank samples its share of the chunks first
        needed = range(corpus.chunks_needed(samples))
        distributed.together(lambda: corpus.sample_chunks(lm, distributed.shard(needed)))
    plan = distributed.on_rank_zero(lambda: planned_rows(corpus, lm, samples, max_length))
    mine = distributed.shard(plan)
    pass_ = _Pass(lm, weights)
    show = progress and distributed.rank() == 0
    distributed.together(lambda: pass_.stream(mine, batch_size, show))
    for accumulator in pass_.accumulators.values():
        accumulator.reduce_over_ranks()
    return pass_.accumulators


class _Pass:
    """The keys of ``weights`` over batches of rows: one forward pass per batch, stopped after
    the highest of their layers, each weight's inputs at the real (unpadded) tokens added to its
    :class:`SecondMoment`."""

    def __init__(self, lm: LoadedModel, weights: Sequence[str]) -> None:
        self.lm = lm
        self.modules = {weight: module_of(weight) for weight in weights}
        self.accumulators = {w: SecondMoment(lm.adapter.matrix_shape(w)[1]) for w in weights}
        layers = sorted({lm.adapter.layer_of(w) for w in weights})
        self.what = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"

    def stream(self, rows: Sequence[list[int]], batch_size: int, show: bool) -> None:
        """Add the keys of every token of ``rows``, ``batch_size`` rows per forward pass."""
        total = sum(map(len, rows))
        with tqdm(total=total, unit="tok", desc=f"input statistics, {self.what}",
                  disable=not show) as bar:  # fmt: skip
            for start in range(0, len(rows), batch_size):
                bar.update(self.add(rows[start : start + batch_size]))

    def add(self, batch: Sequence[list[int]]) -> int:
        """Add the keys of ``batch``'s tokens; returns how many were added."""
        ids, mask = right_padded(self.lm, list(batch))
        taps = dict.fromkeys(set(self.modules.values()), Tap(input=True))
        with torch.no_grad(), tap(self.lm.model, taps, stop=True) as seen:
            run_body(self.lm, ids, mask)
        valid = mask.bool()
        for weight, module in self.modules.items():
            self.accumulators[weight].add(seen[module].input[valid])
        return int(valid.sum())
