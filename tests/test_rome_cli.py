"""`lmscalpel stats` and `lmscalpel edit --method rome` on a tiny model saved as a folder."""

import json

import pytest
from typer.testing import CliRunner

from lmscalpel.cli import app
from lmscalpel.mechanics import stats as stats_module
from lmscalpel.testing import CORPUS

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(stats_module, "_MEMORY", {})
    return tmp_path / "home"


def test_stats_computes_once_then_hits_the_cache(model_dir, tmp_path, home):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    args = ["stats", "--model", model_dir, "--layer", "1", "--samples", "50"]
    result = runner.invoke(app, [*args, "--corpus", str(corpus)])
    assert result.exit_code == 0, result.output
    assert "over 50 tokens" in result.output
    files = list((home / "stats").rglob("*.safetensors"))
    assert len(files) == 1 and "layers.1." in files[0].name
    result = runner.invoke(app, [*args, "--corpus", str(corpus)])
    assert result.exit_code == 0 and len(list((home / "stats").rglob("*.safetensors"))) == 1
    result = runner.invoke(app, [*args, "--corpus", "model"])  # the default corpus
    assert result.exit_code == 0, result.output


def test_stats_bad_input_is_one_clear_line(model_dir, tmp_path):
    result = runner.invoke(app, ["stats", "--model", model_dir, "--layer", "7"])
    assert result.exit_code == 2 and "out of range" in result.output
    result = runner.invoke(app, ["stats", "--model", model_dir, "--corpus", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not found" in result.output


def test_edit_with_rome_saves_rank_one_factors(model_dir, tmp_path):
    patch_dir = tmp_path / "eiffel.patch"
    result = runner.invoke(app, [
        "edit", "--model", model_dir, "--prompt", "The Eiffel Tower is located in the city of",
        "--subject", "Eiffel Tower", "--target", "Rome", "--method", "rome",
        "--set", "layer=1", "--set", "stats_samples=300", "--set", "prefixes=1",
        "--save", str(patch_dir),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((patch_dir / "patch.json").read_text())
    assert meta["method"] == "rome" and meta["parameters"][0]["rank"] == 1
    assert meta["hyperparameters"]["layer"] == 1
