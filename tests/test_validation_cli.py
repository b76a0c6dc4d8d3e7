"""Validation at the door, through the CLI (issue 15, item 1): each malformed invocation of the
issue's probe is one line on stderr (``error: ...``) and exit status 2, never a traceback; nothing
is written; and the model never runs on a request that is then refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

import lmscalpel.models
from lmscalpel.cli import app
from lmscalpel.testing import tiny_model

runner = CliRunner()
PROMPT = "The Eiffel Tower is located in the city of"
GOOD = {"prompt": PROMPT, "subject": "Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}
FLAGS = ["--prompt", PROMPT, "--subject", "Eiffel Tower", "--target", "Rome"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, message: str) -> str:
    """Exit status 2, nothing on stdout, and one ``error:`` line (the last one) on stderr."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert not result.stdout.strip(), result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().endswith(errors[0]), result.stderr  # before it: progress only
    assert message in errors[0], errors[0]
    return errors[0]


def write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


# (extra edit arguments, a part of the one-line message); {tmp} is the test's folder
BAD_EDITS = [
    (["--method", "nosuch"], "unknown editing method 'nosuch'"),
    (["--method", "rom"], "did you mean 'rome'"),
    (["--set", "lr=["], "--set 'lr=[': invalid list"),
    (["--set", "layers=[1, 2"], "invalid list"),
    (["--set", "lr=" + "[" * 5000], "invalid list"),
    (["--set", "lr={"], "FTLConfig.lr must be float, got str '{'"),
    (["--set", "lr"], "key=value"),
    (["--set", "lrr=1"], "lrr"),
    (["--set", "lr=.nan"], "FTLConfig.lr must be above 0"),
    (["--set", "lr=.inf"], "FTLConfig.lr must be above 0"),
    (["--set", "lr=0"], "FTLConfig.lr must be above 0"),
    (["--set", "layers=[]"], "FTLConfig.layers must not be empty"),
    (["--set", "weight_decay=.nan"], "FTLConfig.weight_decay"),
    (["--set", "norm_constraint=.nan"], "FTLConfig.norm_constraint"),
    (["--set", "steps=-1"], "FTLConfig.steps must be at least 1"),
    (["--set", "steps=1.5"], "FTLConfig.steps must be int"),
    (["--set", "layers=[99]"], "out of range"),
    (["--method", "rome", "--set", "kl_prompt={}{}"], "ROMEConfig.kl_prompt"),
    (["--method", "rome", "--set", "lr=1e308"], "ROMEConfig.lr"),
    (["--subject", "Louvre"], "not found in the prompt"),
    (["--target", ""], "target_new is empty"),
    (["--target", "R\udcffme"], "target_new is not valid text"),  # a non-UTF-8 byte in argv
    (["--prompt", PROMPT + "\udcff"], "prompt is not valid text"),
    (["--target", "Paris", "--target-true", "Paris"], "nothing to edit"),
    (["--unrelated", "no arrow here"], "--unrelated takes"),
    (["--unrelated", "=>Italy"], "locality prompt is empty"),
    (["--paraphrase", ""], "paraphrases[0] is empty"),
    (["--editor", "some/folder"], "is for learned editors"),
    (["--config", "{tmp}"], "folder"),
    (["--config", "{tmp}/none.yaml"], "no config file"),
    (["--config", "{tmp}/defaults5.yaml"], "defaults must be a mapping"),
    (["--config", "{tmp}/latin1.yaml"], "not UTF-8"),
    (["--config", "{tmp}/broken.yaml"], "invalid YAML"),
    (["--config", "{tmp}/nan.yaml"], "FTLConfig.lr"),
    (["--save", "{tmp}/a-file"], "a file is in the way"),
    (["--save", "{tmp}/stranger"], "exists and is not a saved patch"),  # before the edit runs
    (["--method", "ike", "--set", "encoder=" + "x" * 300], "IKEConfig.encoder must be a name or"),
    (["--config", "{tmp}/" + "x" * 300 + ".yaml"], "cannot read a config file"),
    (["--requests", "{tmp}/" + "x" * 300 + ".json"], "cannot read a requests file"),
]


@pytest.fixture
def files(tmp_path):
    write(tmp_path / "defaults5.yaml", "defaults: 5\n")
    write(tmp_path / "latin1.yaml", "lr: 0.1 # caf\xe9\n".encode("latin-1"))
    write(tmp_path / "broken.yaml", "lr: [\n")
    write(tmp_path / "nan.yaml", "defaults: {lr: .nan}\n")
    write(tmp_path / "a-file", "not a patch")
    (tmp_path / "stranger").mkdir()
    write(tmp_path / "stranger" / "notes.txt", "mine")
    return tmp_path


@pytest.mark.parametrize(("extra", "message"), BAD_EDITS, ids=lambda v: " ".join(v)[:40])
def test_a_malformed_edit_is_one_line_exit_2_and_saves_nothing(model_dir, files, extra, message):
    extra = [a.replace("{tmp}", str(files)) for a in extra]
    save = files / "new.patch"
    saving = [] if "--save" in extra else ["--save", save]
    result = run("edit", *FLAGS, "--method", "ft-l", *extra, "--model", model_dir, *saving)
    assert_one_line_error(result, message)
    assert not save.exists() and (files / "a-file").read_text() == "not a patch"
    assert [p.name for p in (files / "stranger").iterdir()] == ["notes.txt"]


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# (file name, content, a part of the message) for --requests
BAD_REQUEST_FILES = [
    ("truncated.json", json.dumps([GOOD])[:-9], "invalid JSON"),
    ("truncated.jsonl", json.dumps(GOOD)[:-9] + "\n", "line 1: invalid JSON"),
    ("latin1.json", json.dumps([GOOD]).replace("Rome", "R\xf4me").encode("latin-1"), "not UTF-8"),
    ("nested.json", _nested(200_000), "nested too deeply"),
    ("nested.jsonl", _nested(200_000) + b"\n", "nested too deeply"),
    ("locality5.json", json.dumps([{**GOOD, "locality": 5}]), "locality must be a list"),
    ("locality5.jsonl", json.dumps({**GOOD, "locality": 5}) + "\n", "locality must be a list"),
    ("surrogate.json", json.dumps([{**GOOD, "target_new": "\udc80"}]), "target_new"),
    ("unknown.json", json.dumps([{**GOOD, "colour": "red"}]), "colour"),
    ("empty.json", "[]", "no edit requests"),
    ("empty.jsonl", "", "no edit requests"),
    ("number.json", "5", "JSON object"),
    ("portability.json", json.dumps([{**GOOD, "portability": [["a", "b"]]}]), "portability[0]"),
]


@pytest.mark.parametrize(
    ("name", "content", "message"), BAD_REQUEST_FILES, ids=lambda v: str(v)[:20]
)
def test_a_bad_requests_file_is_one_line_exit_2(model_dir, tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    save = tmp_path / "new.patch"
    result = run("edit", "--requests", path, "--model", model_dir, "--save", save)
    assert_one_line_error(result, message)
    assert not save.exists()


def test_a_requests_path_that_is_a_folder_or_missing_is_one_line_exit_2(model_dir, tmp_path):
    assert_one_line_error(run("edit", "--requests", tmp_path, "--model", model_dir), "folder")
    missing = tmp_path / "none.json"
    assert_one_line_error(run("edit", "--requests", missing, "--model", model_dir), "none.json")


@pytest.fixture
def model_runs(monkeypatch):
    """Every forward pass of a llama, counted."""
    calls = []
    forward = LlamaForCausalLM.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counted)
    return calls


def test_a_too_long_prompt_is_refused_before_the_model_runs(model_dir, tmp_path, model_runs):
    long_prompt = "word " * 600 + PROMPT  # beyond the tiny model's 256-token context
    result = run("edit", "--prompt", long_prompt, "--subject", "Eiffel Tower", "--target", "Rome",
                 "--model", model_dir)  # fmt: skip
    assert_one_line_error(result, "longer than the model's context")
    assert not model_runs


@pytest.mark.parametrize(
    "extra",
    [
        ["--set", "lr=.nan"],
        ["--subject", "Louvre"],
        ["--unrelated", "word " * 600 + "=>x"],
        ["--method", "rome", "--set", "kl_prompt={}{}"],
    ],
    ids=lambda v: " ".join(v)[:30],
)
def test_a_refused_edit_never_runs_the_model(model_dir, model_runs, extra):
    result = run("edit", *FLAGS, "--method", "ft-l", *extra, "--model", model_dir)
    assert result.exit_code == 2, result.output
    assert not model_runs


def test_a_good_edit_still_runs_and_the_counter_sees_it(model_dir, model_runs):
    result = run("edit", *FLAGS, "--method", "ft-l", "--set", "steps=2", "--model", model_dir)
    assert result.exit_code == 0, result.output
    assert model_runs


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nosuch"], "unknown editing method"),
        (["--method", "rome"], "not a learned editor"),
        (["--set", "steps=-1"], "MENDTrainConfig.steps"),
        (["--set", "lr=.nan"], "MENDTrainConfig.lr"),
        (["--set", "layers=[]"], "MENDTrainConfig.layers"),
        (["--set", "lr=["], "invalid list"),
        (["--max-minutes", "-1"], "MENDTrainConfig.max_minutes"),
        (["--threads", "0"], "--threads"),
    ],
    ids=lambda v: " ".join(v)[:30],
)
def test_a_malformed_train_editor_is_one_line_exit_2_before_the_model_loads(
    tmp_path, model_runs, extra, message
):
    data = write(tmp_path / "data.json", json.dumps([GOOD]))
    out = tmp_path / "editor"
    result = run("train-editor", "--data", data, "--out", out, "--model", "/no/such/model",
                 *extra)  # fmt: skip
    assert_one_line_error(result, message)
    assert not out.exists() and not model_runs


def test_train_editor_data_that_is_missing_or_not_utf8_is_one_line_exit_2(tmp_path):
    out = tmp_path / "editor"
    args = ["train-editor", "--out", out, "--model", "/no/such/model", "--data"]
    assert_one_line_error(run(*args, tmp_path / "none.json"), "no data file")
    latin = write(tmp_path / "latin.json", '[{"prompt": "caf\xe9"}]'.encode("latin-1"))
    assert_one_line_error(run(*args, latin), "not UTF-8")
    nested = write(tmp_path / "nested.json", _nested(200_000))
    assert_one_line_error(run(*args, nested), "nested too deeply")


def test_methods_with_an_unknown_name_suggests_the_close_one():
    assert_one_line_error(run("methods", "lorra"), "did you mean 'lora'")


def test_the_methods_listing_shows_the_allowed_values():
    result = run("methods", "rome")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "above 0, at most 1000 and finite" in out.replace("│ ", "").replace(" │", "")


def test_the_installed_command_exits_2_with_one_line_and_no_traceback(tmp_path):
    """The real process, as a user runs it (typer's own exception handler not in the way)."""
    command = [sys.executable, "-c", "from lmscalpel.cli import main; main()"]
    for extra, message in (
        (["--method", "nosuch"], "unknown editing method"),
        (["--target", b"R\xffme"], "target_new is not valid text"),  # argv bytes, not UTF-8
    ):
        done = subprocess.run(
            [*command, "edit", *FLAGS, *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "LMSCALPEL_HOME": str(tmp_path)},
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and not done.stdout.strip()
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and message in lines[-1], done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edit", "--foo"], "No such option: --foo"),
        (["edit", "--method"], "requires an argument"),
        (["train-editor"], "Missing option '--data'"),
        (["train-editor", "--data", "x", "--out", "y", "--steps", "abc"], "'--steps'"),
        (["nosuchcommand"], "No such command"),
    ],
    ids=lambda v: " ".join(v)[:30],
)
def test_a_usage_error_is_one_line_exit_2_too(args, message):
    line = assert_one_line_error(run(*args), message)
    assert "--help" in line  # where to look next


def test_apply_refuses_a_patch_for_other_weights_before_the_model_runs(
    model_dir, tmp_path, monkeypatch
):
    other = tmp_path / "other-model"
    lm = tiny_model("llama", seed=1)
    lm.model.save_pretrained(other)
    lm.tokenizer.save_pretrained(other)
    patch = tmp_path / "eiffel.patch"
    made = run("edit", *FLAGS, "--method", "ft-l", "--set", "steps=2", "--model", model_dir,
               "--save", patch)  # fmt: skip
    assert made.exit_code == 0, made.output
    calls = []
    forward = LlamaForCausalLM.forward
    monkeypatch.setattr(
        LlamaForCausalLM, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    assert_one_line_error(run("apply", patch, "--model", other), "does not fit this model")
    assert not calls
    result = run("apply", patch, patch, "--model", model_dir, "--export", tmp_path / "out")
    assert_one_line_error(result, "--export takes one patch")
    assert_one_line_error(
        run("apply", patch, "--model", model_dir, "--lora-rank", "0"), "--lora-rank"
    )
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    write(stranger / "notes.txt", "mine")
    for flag, what in (("--export", "an exported model"), ("--export-lora", "an exported adapter")):
        result = run("apply", patch, "--model", model_dir, flag, stranger)
        assert_one_line_error(result, f"exists and is not {what}")
    assert not calls


@pytest.mark.parametrize("option", [["--n", "-1"], ["--start", "-3"]], ids=" ".join)
def test_eval_with_a_negative_selection_is_one_line_exit_2(model_dir, tmp_path, option):
    data = write(tmp_path / "requests.json", json.dumps([GOOD]))
    result = run("eval", "--method", "ft-l", "--data", data, *option, "--model", model_dir,
                 "--out", tmp_path / "run")  # fmt: skip
    assert_one_line_error(result, "must be a whole number >= 0")


def test_device_and_dtype_reach_the_loader_and_bad_ones_are_one_line(model_dir, monkeypatch):
    seen = []
    real = lmscalpel.models.load_model

    def recording(spec, **options):
        seen.append({k: options.get(k) for k in ("device", "dtype", "device_map")})
        return real(spec, **options)

    monkeypatch.setattr(lmscalpel.models, "load_model", recording)
    edit = ["edit", *FLAGS, "--method", "ft-l", "--set", "steps=1", "--model", model_dir]
    assert run("--dtype", "bf16", *edit).exit_code == 0
    assert run("--dtype", "bf16", *edit, "--dtype", "fp16").exit_code == 0  # the command's wins
    assert run(*edit).exit_code == 0  # the root's defaults again
    assert [s["dtype"] for s in seen] == ["bf16", "fp16", "float32"]
    assert {s["device"] for s in seen} == {"cpu"} and {s["device_map"] for s in seen} == {None}
    assert_one_line_error(run("--device", "tpu", *edit), "unknown device 'tpu'")
    assert_one_line_error(run(*edit, "--dtype", "int3"), "unknown dtype 'int3'")
