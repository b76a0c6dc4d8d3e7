"""Loading a model never runs code from its folder unless the user opts in (issue 16, item 3).

A tiny model folder carries custom modelling code whose import would create a marker file: it is
refused (Python API, CLI, and as a cached hub id), the marker never appears, and transformers
never asks on the terminal. ``trust_remote_code=False`` is what transformers always gets, unless
the user opts in. Pickle-only weights are refused with a message saying how to convert them, and
load with ``allow_pickle=True``; safetensors are preferred when both are there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import lmscalpel.models
from lmscalpel import load_model
from lmscalpel.cli.app import app
from lmscalpel.models import ModelNotAvailableError
from lmscalpel.models.loading import UnsafeModelError
from lmscalpel.testing import tiny_model

MODELING = """
from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class XConfig(LlamaConfig):
    model_type = "x-custom"
class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
"""


def save_tiny(folder: Path) -> Path:
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def add_custom_code(folder: Path, marker: Path, auto_map: bool = True) -> None:
    (folder / "modeling_x.py").write_text(MODELING.format(marker=str(marker)))
    if auto_map:
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {
            "AutoConfig": "modeling_x.XConfig",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM",
        }
        (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def custom(tmp_path):
    folder = save_tiny(tmp_path / "custom")
    marker = tmp_path / "MARKER"
    add_custom_code(folder, marker)
    return folder, marker


@pytest.fixture(autouse=True)
def no_terminal_question(monkeypatch):
    """transformers' "Do you wish to run the custom code?" must never be asked."""
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked on the terminal"))


def test_a_folder_with_custom_code_is_refused_and_its_code_never_runs(custom):
    folder, marker = custom
    with pytest.raises(UnsafeModelError, match="trust_remote_code=True") as refused:
        load_model(folder)
    assert "auto_map in config.json" in str(refused.value) and "modeling_x.py" in str(refused.value)
    assert not marker.exists()
    assert isinstance(refused.value, ModelNotAvailableError)  # the CLI reports it in one line


def test_python_files_alone_count_as_custom_code(tmp_path):
    folder = save_tiny(tmp_path / "model")
    marker = tmp_path / "MARKER"
    add_custom_code(folder, marker, auto_map=False)
    with pytest.raises(UnsafeModelError, match="modeling_x.py"):
        load_model(folder)
    assert not marker.exists()


def test_the_cli_refuses_it_in_one_line(custom):
    folder, marker = custom
    result = CliRunner().invoke(app, ["info", "--model", str(folder)])
    assert result.exit_code == 2, result.output
    assert "--trust-remote-code" in result.output and "Traceback" not in result.output
    assert not marker.exists()


def test_a_cached_hub_id_with_custom_code_is_refused(tmp_path):
    snapshot = tmp_path / "hub" / "models--nobody--custom" / "snapshots" / "abc123"
    save_tiny(snapshot)
    marker = tmp_path / "MARKER"
    add_custom_code(snapshot, marker)
    refs = tmp_path / "hub" / "models--nobody--custom" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = (
        "import lmscalpel as ls\n"
        "from lmscalpel.models.loading import UnsafeModelError\n"
        "try:\n    ls.load_model('nobody/custom')\n"
        "except UnsafeModelError as e:\n    print('REFUSED', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert "REFUSED" in out.stdout, out.stdout + out.stderr
    assert not marker.exists()


def spy(monkeypatch) -> list[dict]:
    """Record the keyword arguments transformers' loaders get (and still load)."""
    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def recording(klass, *args, _real=real, **kwargs):
            seen.append(kwargs)
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    return seen


def test_trust_remote_code_false_is_always_passed(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "model")
    seen = spy(monkeypatch)
    load_model(folder)
    assert len(seen) == 2 and all(kw["trust_remote_code"] is False for kw in seen)
    assert seen[0]["use_safetensors"] is True


def test_opting_in_passes_trust_remote_code_true(custom, monkeypatch):
    folder, _ = custom
    seen = []

    def fake(klass, *args, **kwargs):
        seen.append(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(fake))
    with pytest.raises(OSError, match="stop here"):
        load_model(folder, trust_remote_code=True)
    assert seen[0]["trust_remote_code"] is True


def make_pickle_only(folder: Path) -> None:
    state = {
        k: v.clone()
        for k, v in transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict().items()
    }
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def test_pickle_only_weights_are_refused_with_how_to_convert(tmp_path):
    folder = save_tiny(tmp_path / "model")
    make_pickle_only(folder)
    with pytest.raises(UnsafeModelError, match="allow_pickle=True") as refused:
        load_model(folder)
    message = str(refused.value)
    assert "pytorch_model.bin" in message and "save_pretrained" in message
    assert "--allow-pickle" in message


def test_pickle_weights_load_when_allowed_and_convert_to_safetensors(tmp_path):
    folder = save_tiny(tmp_path / "model")
    expected = load_model(folder).fingerprint
    make_pickle_only(folder)
    lm = load_model(folder, allow_pickle=True)
    assert lm.fingerprint == expected
    converted = tmp_path / "model-safetensors"
    lm.model.save_pretrained(converted)
    lm.tokenizer.save_pretrained(converted)
    assert (converted / "model.safetensors").is_file()
    assert load_model(converted).fingerprint == expected  # the conversion the message describes


def test_safetensors_are_preferred_over_a_pickle_beside_them(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "model")
    torch.save({"not": torch.zeros(1)}, folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    load_model(folder)


def test_the_cli_options_opt_in(tmp_path):
    folder = save_tiny(tmp_path / "model")
    make_pickle_only(folder)
    runner = CliRunner()
    refused = runner.invoke(app, ["info", "--model", str(folder)])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    allowed = runner.invoke(app, ["info", "--model", str(folder), "--allow-pickle"])
    assert allowed.exit_code == 0, allowed.output


def test_the_root_options_opt_in_for_every_command(tmp_path):
    folder = save_tiny(tmp_path / "model")
    make_pickle_only(folder)
    runner = CliRunner()
    allowed = runner.invoke(app, ["--allow-pickle", "info", "--model", str(folder)])
    assert allowed.exit_code == 0, allowed.output
    again = runner.invoke(app, ["info", "--model", str(folder)])  # not remembered
    assert again.exit_code == 2 and "--allow-pickle" in again.output


@pytest.mark.parametrize("args", [["generate", "\udcff"], ["score", "The city of", "\udcff"]])
def test_prompts_that_are_not_text_are_refused_before_the_model_loads(args, monkeypatch):
    monkeypatch.setattr(lmscalpel.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "not valid text" in result.output, result.output
