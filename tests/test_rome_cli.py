"""`lmscalpel stats` and `lmscalpel edit --method rome` on a tiny model saved as a folder."""

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lmscalpel.cli import app
from lmscalpel.mechanics import stats as stats_module
from lmscalpel.mechanics.stats import STATISTICS
from lmscalpel.testing import CORPUS

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def counters() -> tuple[int, int, int]:
    return STATISTICS.computed, STATISTICS.loaded, STATISTICS.remembered


def no_accumulation(*args, **kwargs):
    raise AssertionError("the statistics were computed again instead of read from the cache")


# In a fresh interpreter: the accumulator raises, so only the file on disk can answer.
FRESH_PROCESS = """
import sys
from typer.testing import CliRunner
from lmscalpel.cli import app
from lmscalpel.mechanics import stats

def no_accumulation(*args, **kwargs):
    raise AssertionError("recomputed in a fresh process")

stats._accumulate = no_accumulation
result = CliRunner().invoke(app, sys.argv[1:])
print(result.output)
print("exit", result.exit_code, "counters", stats.STATISTICS.computed, stats.STATISTICS.loaded)
"""


def test_stats_computes_once_then_hits_the_cache(model_dir, tmp_path, home, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    args = ["stats", "--model", model_dir, "--layer", "1", "--samples", "50"]
    args += ["--corpus", str(corpus)]
    computed, loaded, remembered = counters()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "over 50 tokens" in result.output
    assert counters() == (computed + 1, loaded, remembered)  # computed, once
    files = list((home / "stats").rglob("*.safetensors"))
    assert len(files) == 1 and "layers.1." in files[0].name
    written = files[0].stat().st_mtime_ns

    # the same process asks again: answered from memory, no pass over the corpus, no file read
    with monkeypatch.context() as patched:
        patched.setattr(stats_module, "_accumulate", no_accumulation)
        result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert counters() == (computed + 1, loaded, remembered + 1)

    # a fresh process: read from the disk (its accumulator raises), the file left as it was
    env = {**os.environ, "LMSCALPEL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    fresh = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, *args], env=env, capture_output=True, text=True
    )
    assert fresh.returncode == 0, fresh.stderr
    assert "exit 0 counters 0 1" in fresh.stdout, fresh.stdout + fresh.stderr
    assert "over 50 tokens" in fresh.stdout
    assert files[0].stat().st_mtime_ns == written
    assert list((home / "stats").rglob("*.safetensors")) == files

    result = runner.invoke(app, [*args[:-2], "--corpus", "model"])  # the default corpus
    assert result.exit_code == 0, result.output
    assert counters()[0] == computed + 2 and len(list((home / "stats").rglob("*.safetensors"))) == 2


def test_stats_bad_input_is_one_clear_line(model_dir, tmp_path):
    result = runner.invoke(app, ["stats", "--model", model_dir, "--layer", "7"])
    assert result.exit_code == 2 and "out of range" in result.output
    result = runner.invoke(app, ["stats", "--model", model_dir, "--corpus", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not found" in result.output


def test_edit_with_rome_uses_the_statistics_of_lmscalpel_stats(model_dir, tmp_path, monkeypatch):
    result = runner.invoke(app, ["stats", "--model", model_dir, "--layer", "1", "--samples", "300"])
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(stats_module, "_accumulate", no_accumulation)
    computed = STATISTICS.computed
    patch_dir = tmp_path / "eiffel.patch"
    result = runner.invoke(app, [
        "edit", "--model", model_dir, "--prompt", "The Eiffel Tower is located in the city of",
        "--subject", "Eiffel Tower", "--target", "Rome", "--method", "rome",
        "--set", "layer=1", "--set", "stats_samples=300", "--set", "prefixes=1",
        "--save", str(patch_dir),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert STATISTICS.computed == computed
    meta = json.loads((patch_dir / "patch.json").read_text())
    assert meta["method"] == "rome" and meta["parameters"][0]["rank"] == 1
    assert meta["hyperparameters"]["layer"] == 1
