"""Fuzzing the CLI (issue 15): ``lmscalpel edit``, ``eval`` and ``apply`` run in-process (typer's
CliRunner) on a tiny model folder with random and adversarial arguments — odd prompts and targets,
unknown and misspelt methods, ``--set`` values that are not YAML or out of range (``.nan``,
``[``, ``-1``, YAML tags), config and requests files of every broken shape, folders that are not
patches.

Each invocation must succeed (exit 0; a saved patch loads and is finite) or fail the documented
way: exit status 2, nothing on stdout, and one ``error: ...`` line, the last, on stderr (before it
only progress), no traceback — options click itself cannot parse (``--n abc``) included. The model
folder is never changed. The counts go to ``fuzz.json`` (see tests/test_fuzz_api.py).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from lmscalpel.cli import app
from lmscalpel.patch import Patch
from test_fuzz_api import (
    CHEAP,
    GOOD_LINE,
    LONG,
    ODD_TEXT,
    SHORT,
    OverBudget,
    budget,
    config_fields,
    configs,
    finite,
    request_files,
    tally_to_json,
    yaml_text,
)

runner = CliRunner()
PROFILES = [pytest.param(SHORT, id="short"), pytest.param(LONG, id="long", marks=pytest.mark.slow)]
"""Each fuzz test runs briefly in ``make test`` and at length under the slow marker."""
PROMPT = "The Eiffel Tower is located in the city of"
TALLY: Counter[tuple[str, str]] = Counter()
METHODS = ["ft-l", "ft-m", "rome", "lora", "ike", "nosuch", "rom", "", "FT-L", "mend", "ft-l "]
SET_VALUES = [".nan", ".inf", "-.inf", "-1", "0", "1e999", "1e308", "[", "[]", "[1, 2", "{",
              "{a: 1}", "!!python/object/apply:os.system ['true']", "x", "'1'", "null", "~",
              "[" * 5000, "1" * 400, "true", "0x10", "[1, -1]", "[99]", "mlp", "{}{}", "{} is a",
              "", "=", "1=2", "\ud800", "0.5", "2", "[1]"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def fuzz_figures():
    TALLY.clear()
    yield
    tally_to_json(TALLY, "cli")


@pytest.fixture(scope="module", autouse=True)
def fuzz_home(tmp_path_factory):
    """A cache folder of the module's own, and one torch thread."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSCALPEL_HOME", str(tmp_path_factory.mktemp("fuzz-cli-home")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def warm(fuzz_home, model_dir, tmp_path_factory):
    """One good ``edit`` per fuzzed method and one good ``eval``, before any time budget: what
    they import lazily (``datasets``, the sentence encoder, matplotlib) is then imported whole (a
    budget that interrupts an import half-way leaves a broken module for the rest of the process)."""
    folder = tmp_path_factory.mktemp("warm")
    for method, config in CHEAP.items():
        sets = [a for key, value in config.items() for a in ("--set", f"{key}={json.dumps(value)}")]
        result = runner.invoke(app, ["edit", "--model", model_dir, "--method", method, "--prompt",
                                     PROMPT, "--subject", "Eiffel Tower", "--target", "Rome",
                                     *sets])  # fmt: skip
        assert result.exit_code == 0, result.output
    (folder / "data.jsonl").write_bytes(GOOD_LINE + b"\n")
    result = runner.invoke(app, ["eval", "--model", model_dir, "--method", "ft-l", "--data",
                                 str(folder / "data.jsonl"), "--out", str(folder / "out"),
                                 "--set", "steps=2", "--fluency-tokens", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output


def folder_digest(folder: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def judge(area: str, args: list[str], model_dir: str, save: Path | None = None) -> str:
    """Invoke the CLI with ``args``; check the outcome as the module docstring says."""
    before = folder_digest(model_dir)
    with budget():
        result = runner.invoke(app, args)
    if isinstance(result.exception, OverBudget):
        outcome = "over-budget"
    elif result.exit_code == 0:
        outcome = "ok"
        if save is not None and (save / "patch.json").is_file():
            assert finite(Patch.load(save)), "a saved patch has non-finite deltas"
    else:
        shown = (result.stdout or "") + (result.stderr or "")
        assert "Traceback" not in shown, shown[-3000:]
        assert result.exit_code == 2, (result.exit_code, repr(result.exception), shown[-3000:])
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
        if area != "cli-eval":  # eval prints what it evaluates before it runs the model
            assert not result.stdout.strip(), result.stdout[-3000:]
        outcome = "documented-error"
    TALLY[(area, outcome)] += 1
    assert folder_digest(model_dir) == before, "the model folder changed"
    return outcome


# ---- lmscalpel edit ----------------------------------------------------------------------------
@st.composite
def edit_arguments(draw, tmp: Path, model_dir: str) -> tuple[list[str], Path | None, bool]:
    """Arguments of ``lmscalpel edit``, where to look for a saved patch, and whether the
    invocation is a good one that must work."""
    method = draw(st.sampled_from(METHODS))
    args = ["edit", "--model", model_dir, "--method", method]
    pristine = draw(st.integers(0, 4)) == 0  # now and then a good invocation: it must work
    if pristine:
        args += ["--prompt", PROMPT, "--subject", "Eiffel Tower", "--target", "Rome"]
    elif draw(st.integers(0, 3)) == 0:
        path = tmp / "requests.jsonl"
        path.write_bytes(draw(request_files()))
        args += ["--requests", str(path)]
    else:
        prompt = draw(st.one_of(st.just(PROMPT), ODD_TEXT))
        subject = draw(st.one_of(st.just("Eiffel Tower"), ODD_TEXT))
        args += ["--prompt", prompt, "--subject", subject]
        args += ["--target", draw(st.one_of(st.just("Rome"), ODD_TEXT))]
        if draw(st.booleans()):
            args += ["--target-true", draw(st.one_of(st.just("Paris"), ODD_TEXT))]
        for _ in range(draw(st.integers(0, 2))):
            args += ["--paraphrase", draw(st.one_of(st.just("Where is the Eiffel Tower?"),
                                                     ODD_TEXT))]  # fmt: skip
        for _ in range(draw(st.integers(0, 2))):
            args += ["--unrelated", draw(st.one_of(st.just("The capital of Japan is=>Tokyo"),
                                                    ODD_TEXT))]  # fmt: skip
    known = method.strip().lower() in CHEAP
    if known:  # cheap settings first; fuzzed ones after them override
        for key, value in CHEAP[method.strip().lower()].items():
            args += ["--set", f"{key}={json.dumps(value)}"]
    names = config_fields(method.strip().lower()) if known else ["lr", "steps"]
    for _ in range(0 if pristine else draw(st.integers(0, 3))):
        key = draw(st.one_of(st.sampled_from(names), st.sampled_from(["", "nosuch", "lr.x"])))
        value = draw(st.one_of(st.sampled_from(SET_VALUES), ODD_TEXT))
        args += ["--set", draw(st.sampled_from([f"{key}={value}", key, value]))]
    if known and not pristine and draw(st.integers(0, 4)) == 0:
        path = tmp / "config.yaml"
        config = draw(configs(method.strip().lower()))
        path.write_text(yaml_text(draw, method, config), encoding="utf-8", errors="surrogatepass")
        args += ["--config", str(path)]
    save = None
    choice = draw(st.integers(0, 5))
    if choice == 0:
        save = tmp / f"saved-{draw(st.integers(0, 10**9))}.patch"
        args += ["--save", str(save)]
    elif choice == 1:  # a file, or a folder of something else, in the way
        args += ["--save", str(tmp / draw(st.sampled_from(["requests.jsonl", "stranger"])))]
    return args, save, pristine and method in CHEAP and choice != 1


def stranger_folder(tmp: Path) -> None:
    (tmp / "stranger").mkdir(exist_ok=True)
    (tmp / "stranger" / "mine.txt").write_text("not a patch")


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_edit_command(model_dir, tmp_path, profile):
    stranger_folder(tmp_path)

    @profile
    @given(data=st.data())
    def run(data):
        args, save, must_work = data.draw(edit_arguments(tmp_path, model_dir))
        outcome = judge("cli-edit", args, model_dir, save)
        assert outcome in ("ok", "over-budget") or not must_work, args

    run()
    assert (tmp_path / "stranger" / "mine.txt").read_text() == "not a patch"


# ---- lmscalpel eval ----------------------------------------------------------------------------
EVAL_OPTIONS = {
    "--n": ["1", "0", "-1", "abc", "99999999999999999999", "2"],
    "--start": ["0", "-3", "5", "x"],
    "--protocol": ["single", "batch", "sequential", "parallel", "", "SINGLE"],
    "--batch-size": ["0", "-1", "2", "x", "1e9"],
    "--checkpoints": ["1,2", "", "0", "-1", "a,b", "2,1", "1,,2"],
    "--fluency-cases": ["0", "1", "-1"],
    "--fluency-tokens": ["0", "4", "-5"],
    "--layout": ["requests", "counterfact", "nosuch", ""],
}


@st.composite
def eval_arguments(draw, tmp: Path, model_dir: str) -> list[str]:
    data = tmp / "eval.jsonl"
    data.write_bytes(draw(request_files()))
    method = draw(st.sampled_from(["ft-l", "ft-m", "nosuch", ""]))
    args = ["eval", "--model", model_dir, "--method", method, "--data", str(data),
            "--out", str(tmp / f"out-{draw(st.integers(0, 3))}"), "--fluency-prompts", "1",
            "--fluency-tokens", "4", "--set", "steps=2", "--set", "layers=[1]"]  # fmt: skip
    for option in draw(st.lists(st.sampled_from(sorted(EVAL_OPTIONS)), max_size=3, unique=True)):
        args += [option, draw(st.one_of(st.sampled_from(EVAL_OPTIONS[option]), ODD_TEXT))]
    if draw(st.booleans()):
        args += ["--set", f"{draw(st.sampled_from(['lr', 'steps', 'x']))}="
                          f"{draw(st.sampled_from(SET_VALUES))}"]  # fmt: skip
    return args


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_eval_command(model_dir, tmp_path, profile):
    @profile
    @given(data=st.data())
    def run(data):
        judge("cli-eval", data.draw(eval_arguments(tmp_path, model_dir)), model_dir)

    run()


# ---- lmscalpel apply ---------------------------------------------------------------------------
@st.composite
def patch_folders(draw, tmp: Path) -> Path:
    """A folder that looks a little like a saved patch: files of random content."""
    folder = tmp / f"p{draw(st.integers(0, 10**9))}"
    folder.mkdir(exist_ok=True)
    meta = draw(st.one_of(
        st.just(b'{"format": "lmscalpel-patch", "format_version": 2, "parameters": []}'),
        st.just(b'{"format": "lmscalpel-patch"}'),
        st.sampled_from([b"[]", b"{", b"\xff", b"5", b'{"format": 5}', b""]),
        st.binary(max_size=64),
    ))  # fmt: skip
    (folder / "patch.json").write_bytes(meta)
    if draw(st.booleans()):
        (folder / "deltas.safetensors").write_bytes(draw(st.binary(max_size=256)))
    return folder


@pytest.mark.parametrize("profile", PROFILES)
def test_fuzz_apply_command(model_dir, tmp_path, profile):
    @profile
    @given(data=st.data())
    def run(data):
        folders = data.draw(st.lists(patch_folders(tmp_path), min_size=1, max_size=2))
        judge("cli-apply", ["apply", *map(str, folders), "--model", model_dir], model_dir)

    run()


@pytest.mark.parametrize("option", [["--start", "-3"], ["--n", "-1"]])
def test_a_negative_selection_is_one_line(model_dir, tmp_path, option):
    """Found by this suite: a bare ValueError (exit 1, a traceback) from the case selection."""
    data = tmp_path / "eval.jsonl"
    data.write_bytes(GOOD_LINE + b"\n")
    args = ["eval", "--model", model_dir, "--method", "ft-l", "--data", str(data),
            "--out", str(tmp_path / "out"), *option]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stderr.strip().startswith("error:"), result.output
    assert not (tmp_path / "out").exists()


def test_a_save_folder_in_the_way_is_refused_before_the_model_runs(model_dir, tmp_path):
    """Found by this suite: the edit ran (and printed its answers) before ``--save`` was refused."""
    stranger_folder(tmp_path)
    args = ["edit", "--model", model_dir, "--method", "ft-l", "--prompt", PROMPT, "--subject",
            "Eiffel Tower", "--target", "Rome", "--set", "steps=2", "--save",
            str(tmp_path / "stranger")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "is not a saved patch" in result.stderr
    assert not result.stdout.strip(), result.stdout
    assert (tmp_path / "stranger" / "mine.txt").read_text() == "not a patch"
