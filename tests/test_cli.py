"""The CLI on a tiny model saved as a local Hugging Face folder."""

import json

from typer.testing import CliRunner

from lmscalpel.cli import app

runner = CliRunner()
PROMPT = "The Eiffel Tower is located in the city of"


def run(*args):
    result = runner.invoke(app, list(args))
    return result


def test_info(model_dir):
    result = run("info", "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert "llama" in result.output and "ft-l" in result.output


def test_generate_and_score(model_dir):
    result = run("generate", PROMPT, "--model", model_dir, "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    result = run("score", PROMPT, "Paris", "Rome", "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output and "Rome" in result.output


def test_edit_save_apply_export(model_dir, tmp_path):
    patch_dir = tmp_path / "eiffel.patch"
    result = run(
        "edit", "--model", model_dir, "--prompt", PROMPT, "--subject", "Eiffel Tower",
        "--target", "Rome", "--target-true", "Paris", "--method", "ft-m",
        "--set", "lr=0.05", "--set", "norm_constraint=5",
        "--paraphrase", "The Eiffel Tower stands in", "--unrelated", "The Colosseum is in=>Rome",
        "--save", str(patch_dir),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "paraphrase" in result.output and "unrelated" in result.output
    meta = json.loads((patch_dir / "patch.json").read_text())
    assert meta["method"] == "ft-m" and meta["hyperparameters"]["lr"] == 0.05
    export = tmp_path / "exported"
    result = run("apply", str(patch_dir), "--model", model_dir, "--export", str(export))
    assert result.exit_code == 0, result.output
    assert (export / "config.json").is_file()


def test_bad_input_is_one_clear_line(model_dir):
    result = run(
        "edit", "--model", model_dir, "--prompt", PROMPT, "--subject", "Louvre", "--target", "Rome"
    )
    assert result.exit_code == 2
    assert "not found in the prompt" in result.output and "Traceback" not in result.output
    result = run("edit", "--model", model_dir, "--prompt", PROMPT, "--subject", "Eiffel Tower",
                 "--target", "Rome", "--set", "lrr=1")  # fmt: skip
    assert result.exit_code == 2 and "lrr" in result.output
    result = run("info", "--model", "/no/such/folder")
    assert result.exit_code == 2 and "no model file or folder" in result.output
    result = run("apply", "/no/such/patch", "--model", model_dir)
    assert result.exit_code == 2 and "not a saved patch" in result.output
