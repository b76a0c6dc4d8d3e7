"""Shared fixtures: tiny random models for mechanics, the embedded model for reality."""

from __future__ import annotations

import pytest

from lmscalpel.testing import TINY_MODEL_TYPES, tiny_model

EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.fixture(params=TINY_MODEL_TYPES)
def any_tiny(request):
    """A tiny random model of each supported architecture in turn."""
    return tiny_model(request.param)


@pytest.fixture
def tiny():
    return tiny_model("llama")


@pytest.fixture
def tiny_gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (converted once, then cached)."""
    from lmscalpel import load_model

    return load_model()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny llama saved as a local Hugging Face folder (for the CLI)."""
    folder = tmp_path_factory.mktemp("tiny")
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)
