import pytest
import torch

from lmscalpel.models.loading import ModelNotAvailableError
from lmscalpel.retrieval import (
    EMBEDDINGS,
    SentenceEncoder,
    encoder_path,
    load_encoder,
    most_similar,
)

POOL = [
    "The Eiffel Tower is located in the city of Paris",
    "Danielle Darrieux speaks French",
    "Toko Yasuda plays the guitar",
    "The Colosseum is located in the city of Rome",
    "Apple was founded by Steve Jobs",
]


def test_most_similar_ranks_by_cosine_and_breaks_ties_by_index():
    keys = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), dim=1
    )
    scores, order = most_similar(torch.tensor([1.0, 0.1]), keys, 3)
    assert order.tolist() == [0, 3, 2]
    assert scores[0] == pytest.approx(scores[1]) and scores[1] > scores[2]
    scores, order = most_similar(keys[:2], keys, 10)  # batched, k clipped to the pool
    assert order.shape == (2, 4) and order[1, 0] == 1


def test_bundled_encoder_finds_the_most_similar_pool_items():
    encoder = load_encoder()
    assert encoder is load_encoder("all-MiniLM-L6-v2")  # one instance per process
    keys = encoder.encode(POOL)
    assert keys.shape == (len(POOL), 384)
    assert torch.allclose(keys.norm(dim=1), torch.ones(len(POOL)), atol=1e-5)
    queries = encoder.encode(
        ["Where is the Eiffel Tower?", "Which instrument does Toko Yasuda play?"]
    )
    _, order = most_similar(queries, keys, 2)
    assert order[:, 0].tolist() == [0, 2]


def test_pool_embeddings_are_cached_on_disk_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path))
    first = SentenceEncoder(encoder_path()).encode_cached(POOL)
    files = list((tmp_path / "embeddings").glob("*.safetensors"))
    assert len(files) == 1

    assert EMBEDDINGS.computed >= 1
    EMBEDDINGS.forget()
    loaded = EMBEDDINGS.loaded
    fresh = SentenceEncoder(encoder_path())  # a new process, in effect: nothing in memory

    def no_model(*args, **kwargs):
        raise AssertionError("the cached embeddings should have been read from disk")

    monkeypatch.setattr(fresh, "encode", no_model)
    assert torch.equal(fresh.encode_cached(POOL), first)
    assert EMBEDDINGS.loaded == loaded + 1  # from the disk
    # other texts are another cache entry
    SentenceEncoder(encoder_path()).encode_cached(POOL[:3])
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 2


def test_a_missing_encoder_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no sentence-transformers encoder"):
        encoder_path(tmp_path / "nowhere")
