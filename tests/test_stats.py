"""Second-moment statistics: the math, the corpora, the cache and its key."""

import json

import pytest
import torch

from lmscalpel.core.config import ConfigError
from lmscalpel.mechanics import stats
from lmscalpel.mechanics.stats import (
    SampledCorpus,
    SecondMoment,
    TextCorpus,
    input_statistics,
    key_statistics,
    resolve_corpus,
    statistics_path,
)
from lmscalpel.models.adapter import module_of
from lmscalpel.runtime.hooks import Tap, tap
from lmscalpel.testing import CORPUS, tiny_model


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(CORPUS))
    return path


def test_streaming_moment_equals_the_batch_formula():
    torch.manual_seed(0)
    keys = torch.randn(100, 8)
    acc = SecondMoment(8)
    for chunk in keys.split(7):
        acc.add(chunk)
    assert acc.count == 100
    assert torch.allclose(acc.moment(), (keys.T @ keys).double() / 100, atol=1e-10)


def corpus_inputs(lm, module: str) -> torch.Tensor:
    """The inputs ``module`` sees over every token of the corpus, document by document."""
    inputs = []
    for doc in CORPUS:
        ids = lm.tokenizer(doc, return_tensors="pt")["input_ids"]
        with tap(lm.model, {module: Tap(input=True)}) as seen:
            lm.model(input_ids=ids)
        inputs.append(seen[module].input[0])
    return torch.cat(inputs)


def test_statistics_equal_the_keys_of_every_corpus_token(tiny, corpus_file):
    layer = 1
    result = key_statistics(tiny, layer, corpus_file, samples=10_000, progress=False)
    keys = corpus_inputs(tiny, tiny.adapter.mlp_out_name(layer))
    assert result.count == len(keys)  # the corpus is smaller than asked: all of it is used
    expected = keys.T.double() @ keys.double() / len(keys)
    assert torch.allclose(result.moment.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_input_statistics_of_several_weights_come_from_one_pass(
    model_type, corpus_file, monkeypatch
):
    """Any weight's input second moment (GPT-2's transposed Conv1D included), several weights in
    one pass, each equal to the inputs its module saw; then each is read from its own cache."""
    lm = tiny_model(model_type)
    a = lm.adapter
    weights = [a.mlp_in_weight_names(0)[0], a.mlp_out_weight_name(1)]
    passes = []
    handle = a.layer(0).register_forward_hook(lambda *args: passes.append(1))
    try:
        result = input_statistics(lm, weights, corpus_file, samples=10_000, progress=False)
    finally:
        handle.remove()
    n_batches = len(passes)
    for weight in weights:
        inputs = corpus_inputs(lm, module_of(weight))
        assert result[weight].moment.shape == (a.matrix_shape(weight)[1],) * 2
        assert result[weight].layer == a.layer_of(weight)
        expected = inputs.T.double() @ inputs.double() / len(inputs)
        assert torch.allclose(result[weight].moment.double(), expected, rtol=1e-4, atol=1e-5)
    assert n_batches == -(-len(CORPUS) // 16)  # one pass for both weights
    stats.STATISTICS.forget()
    monkeypatch.setattr(stats, "_accumulate", lambda *a, **k: pytest.fail("recomputed"))
    again = input_statistics(lm, weights[::-1], corpus_file, samples=10_000, progress=False)
    assert all(torch.equal(again[w].moment, result[w].moment) for w in weights)


def test_only_the_layers_up_to_the_edited_one_run(tiny, corpus_file):
    calls = []
    above = tiny.adapter.layer(2)
    handle = above.register_forward_hook(lambda *args: calls.append(1))
    try:
        key_statistics(tiny, 1, corpus_file, samples=50, progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_cache_hit_miss_and_key(tiny, corpus_file, home, monkeypatch):
    first = key_statistics(tiny, 1, corpus_file, samples=60, progress=False)
    path = statistics_path(tiny, 1, resolve_corpus(corpus_file), 60)
    assert first.path == path and path.is_file()
    assert path.is_relative_to(home / "stats" / tiny.fingerprint)
    assert tiny.adapter.mlp_out_weight_name(1) in path.name and ".60." in path.name
    assert first.count == 60

    # in the same process the very object is remembered (its Cholesky factor with it)
    first.solve(torch.ones(first.moment.shape[0]))
    monkeypatch.setattr(stats, "_accumulate", lambda *a, **k: pytest.fail("recomputed"))
    assert key_statistics(tiny, 1, corpus_file, samples=60, progress=False) is first

    # a hit in a fresh process (empty memory) reads the file and runs no model
    stats.STATISTICS.forget()
    loaded = stats.STATISTICS.loaded
    again = key_statistics(tiny, 1, corpus_file, samples=60, progress=False)
    assert torch.equal(again.moment, first.moment) and again.count == 60
    assert (again.layer, again.corpus, again.path, again.weight) == (
        first.layer, first.corpus, first.path, first.weight
    )  # fmt: skip
    assert stats.STATISTICS.loaded == loaded + 1
    monkeypatch.undo()
    monkeypatch.setenv("LMSCALPEL_HOME", str(home))

    # every part of the key matters
    other_samples = key_statistics(tiny, 1, corpus_file, samples=30, progress=False)
    other_layer = key_statistics(tiny, 2, corpus_file, samples=60, progress=False)
    assert len({first.path, other_samples.path, other_layer.path}) == 3
    assert not torch.allclose(other_samples.moment, first.moment)
    corpus_file.write_text(corpus_file.read_text() + "\n\nA new document.")
    assert resolve_corpus(corpus_file).id != first.corpus


def test_sampled_corpus_is_reproducible_and_extends(tiny, home):
    corpus = SampledCorpus(length=16, chunk=4)
    rows = corpus.rows(tiny, max_length=8)
    first = [next(rows) for _ in range(12)]  # spans more than one chunk
    assert all(1 < len(r) <= 8 for r in first)
    assert len(list((home / "corpora" / tiny.fingerprint).iterdir())) >= 2
    again = corpus.rows(tiny, max_length=8)
    assert [next(again) for _ in range(12)] == first
    assert SampledCorpus(seed=1).id != corpus.id


def test_default_corpus_is_the_model_itself(tiny):
    assert isinstance(resolve_corpus(None), SampledCorpus)
    result = key_statistics(tiny, 0, samples=200, progress=False)
    assert result.count == 200 and result.corpus.startswith("model")
    assert torch.linalg.eigvalsh(result.moment.double()).min() > -1e-6  # PSD


def test_text_formats(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("one doc\n\nanother doc\n")
    (folder / "b.jsonl").write_text(
        json.dumps({"text": "from jsonl"}) + "\n" + json.dumps({"text": ""}) + "\n"
    )
    (folder / "c.json").write_text(json.dumps(["from json", {"text": "object"}]))
    (folder / "ignored.csv").write_text("x")
    corpus = TextCorpus([folder])
    assert [p.name for p in corpus.files] == ["a.txt", "b.jsonl", "c.json"]
    docs = [d for p in corpus.files for d in stats._documents(p)]
    assert docs == ["one doc", "another doc", "from jsonl", "from json", "object"]


def test_bad_corpora_are_reported(tmp_path, tiny):
    with pytest.raises(ConfigError, match="not found"):
        resolve_corpus(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="'text'"):
        key_statistics(tiny, 0, bad, samples=10, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt"):
        TextCorpus([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="at least one"):
        key_statistics(tiny, 0, samples=0)


def test_solve_inverts_the_moment():
    torch.manual_seed(0)
    keys = torch.randn(200, 6)
    moment = keys.T @ keys / 200
    result = stats.KeyStatistics(moment, 200, 0, "x")
    k = torch.randn(6)
    assert torch.allclose(moment.double() @ result.solve(k), k.double(), atol=1e-6)
    two = torch.randn(2, 6)
    assert result.solve(two).shape == (2, 6)


def test_a_hugging_face_dataset_on_disk_gives_the_statistics_of_its_texts(tiny, tmp_path):
    datasets = pytest.importorskip("datasets")  # the `hf` extra (installed with `dev`)
    folder = tmp_path / "saved"
    texts = [*CORPUS, ""]  # an empty row is skipped, as in text files
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(folder)
    from_disk = key_statistics(tiny, 1, folder, samples=10_000, progress=False)
    assert from_disk.corpus.startswith("hf_saved-")
    as_jsonl = tmp_path / "corpus.jsonl"
    as_jsonl.write_text("\n".join(json.dumps({"text": t}) for t in CORPUS))
    from_file = key_statistics(tiny, 1, as_jsonl, samples=10_000, progress=False)
    assert from_disk.count == from_file.count
    assert torch.equal(from_disk.moment, from_file.moment)

    splits = tmp_path / "splits"
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": CORPUS})}).save_to_disk(
        splits
    )
    with pytest.raises(ConfigError, match="splits validation, not 'train'"):
        resolve_corpus(splits)
    datasets.Dataset.from_dict({"body": CORPUS}).save_to_disk(tmp_path / "other")
    with pytest.raises(ConfigError, match="no 'text' column .*body"):
        resolve_corpus(tmp_path / "other")


def test_a_hub_dataset_that_is_not_cached_is_a_clear_error_not_a_download(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    calls, before = [], datasets.config.HF_HUB_OFFLINE
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        calls.append(datasets.config.HF_HUB_OFFLINE)
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ConfigError, match="not in the local cache .*never downloads"):
        resolve_corpus("hf:nobody/no-such-corpus:default@train")
    assert calls == [True]  # loaded with the hub switched off
    assert before == datasets.config.HF_HUB_OFFLINE  # and the setting restored afterwards


def test_statistics_cached_by_earlier_versions_stay_valid(tiny, corpus_file, home, monkeypatch):
    """A file in the layout lmscalpel wrote before the one disk cache (same path, same tensor,
    same metadata) is read, not recomputed."""
    from safetensors.torch import save_file

    source = resolve_corpus(corpus_file)
    path = statistics_path(tiny, 1, source, 40)
    assert path == home / "stats" / tiny.fingerprint / (
        f"{tiny.adapter.mlp_out_weight_name(1)}.{source.id}.40.safetensors"
    )
    path.parent.mkdir(parents=True)
    moment = torch.eye(tiny.adapter.matrix_shape(tiny.adapter.mlp_out_weight_name(1))[1])
    metadata = {"count": "40", "layer": "1", "weight": tiny.adapter.mlp_out_weight_name(1),
                "corpus": source.id, "model": tiny.name, "fingerprint": tiny.fingerprint,
                "max_length": "128"}  # fmt: skip
    save_file({"moment": moment}, str(path), metadata=metadata)
    monkeypatch.setattr(stats, "_accumulate", lambda *a, **k: pytest.fail("recomputed"))
    found = key_statistics(tiny, 1, corpus_file, samples=40, progress=False)
    assert torch.equal(found.moment, moment) and found.count == 40 and found.path == path


def test_a_corrupt_statistics_file_is_recomputed(tiny, corpus_file, caplog):
    first = key_statistics(tiny, 1, corpus_file, samples=40, progress=False)
    first.path.write_bytes(first.path.read_bytes()[:100])
    stats.STATISTICS.forget()
    computed = stats.STATISTICS.computed
    again = key_statistics(tiny, 1, corpus_file, samples=40, progress=False)
    assert "unreadable cache entry" in caplog.text and stats.STATISTICS.computed == computed + 1
    assert torch.equal(again.moment, first.moment)


def test_sampled_corpus_chunks_are_read_back_not_sampled_again(tiny, home, monkeypatch):
    corpus = SampledCorpus(length=16, chunk=4)
    first = next(corpus.rows(tiny, max_length=8))
    stats.CORPORA.forget()
    monkeypatch.setattr(tiny.model, "generate", lambda *a, **k: pytest.fail("sampled again"))
    assert next(corpus.rows(tiny, max_length=8)) == first
    assert (home / "corpora" / tiny.fingerprint / f"{corpus.id}-0.safetensors").is_file()
