"""Atomic folders: a writer killed at any moment leaves the complete old or the complete new folder.

The crashes are real: a forked child replaces a folder and is killed with SIGKILL, either at a
random moment or at a chosen step (each rename, flush and delete in turn), with the atomic exchange
of Linux and with the rename-aside fallback of systems without it. After each kill the path holds
one whole version (after :func:`recover_folder`, which readers call), and no leftovers remain.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from lmscalpel.core import files
from lmscalpel.core.files import atomic_folder, discard_folder, recover_folder
from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.mend.checkpoint import (
    EditorCheckpointError,
    load_editor,
    read_editor_config,
    save_editor,
)
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.models import loading
from lmscalpel.patch import ParameterDelta, Patch, PatchError
from lmscalpel.testing import tiny_model

MODES = ["exchange", "fallback"]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


# ---- helpers ---------------------------------------------------------------------------------
def tree(path: Path) -> dict[str, bytes] | None:
    """Every file below ``path`` (relative name -> bytes); None when ``path`` is missing."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def version(generation: int, size: int = 1) -> dict[str, bytes]:
    """The files of one folder version; odd and even versions hold different file names, so a mix
    of two is visible."""
    body = f"generation {generation}\n".encode() * size
    names = ["a.txt", "sub/b.txt", "even.txt" if generation % 2 == 0 else "odd.txt"]
    return {name: body for name in names}


def fill(folder: Path, content: dict[str, bytes], step=lambda: None) -> None:
    for name, data in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        step()
        (folder / name).write_bytes(data)
        step()


def hidden_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def use_mode(mode: str) -> None:
    """In a child: choose the atomic exchange or the fallback (no renameat2 at all)."""
    if mode == "fallback":
        files._renameat2_fn = False


def in_child(work) -> int:
    """Fork; the child runs ``work()`` and exits (never returning into pytest). The pid.

    The child runs torch single-threaded: the parent's OpenMP worker threads do not survive the
    fork, and a parallel region in the child would wait for them forever."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def instrument_files(step) -> None:
    """Make every rename, flush and delete of lmscalpel.core.files a step (in a child only)."""

    def around(function):
        def wrapped(*args, **kwargs):
            step()
            result = function(*args, **kwargs)
            step()
            return result

        return wrapped

    for name in ("_rename2", "fsync_path", "_remove"):
        setattr(files, name, around(getattr(files, name)))
    os.rename = around(os.rename)


# ---- atomic_folder: crashes at every step ----------------------------------------------------
def crash_matrix(tmp_path: Path, mode: str, work, prepare, check) -> list[str]:
    """Kill ``work`` at step 1, 2, ... until it completes; before each run ``prepare()`` and after
    it ``check()`` (which returns what it found). The findings, one per run."""
    found = []
    for kill_at in range(1, 1000):
        prepare()

        def child(kill_at=kill_at):
            use_mode(mode)
            count = [0]

            def step():
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            instrument_files(step)
            work(step)

        code = wait(in_child(child))
        found.append(check())
        if code == 0:
            return found
        assert code == -signal.SIGKILL, f"child failed (exit {code}) at step {kill_at}"
    raise AssertionError("the writer never finished")


@pytest.mark.parametrize("mode", MODES)
def test_replacing_a_folder_killed_at_every_step(tmp_path, mode):
    target = tmp_path / "folder"
    old, new = version(0), version(1)

    def prepare():
        files._remove(target)
        for name in hidden_siblings(target):
            files._remove(tmp_path / name)
        target.mkdir()
        fill(target, old)

    def work(step):
        with atomic_folder(target) as tmp:
            fill(tmp, new, step)

    def check():
        before = tree(target)
        if mode == "exchange":  # never even a moment without a whole folder
            assert before in (old, new)
        recover_folder(target)
        after = tree(target)
        assert after in (old, new), f"half a folder: {after}"
        assert hidden_siblings(target) == []  # the killed writer's leftovers are gone
        return "new" if after == new else "old"

    found = crash_matrix(tmp_path, mode, work, prepare, check)
    assert len(found) > 15  # the writer really was killed at many steps
    assert found[0] == "old" and found[-1] == "new"
    first_new = found.index("new")
    assert set(found[first_new:]) == {"new"}  # once in place, the new folder stays


@pytest.mark.parametrize("mode", MODES)
def test_a_first_write_killed_at_every_step_leaves_the_folder_or_nothing(tmp_path, mode):
    target = tmp_path / "fresh"
    new = version(1)

    def prepare():
        files._remove(target)

    def work(step):
        with atomic_folder(target) as tmp:
            fill(tmp, new, step)

    def check():
        recover_folder(target)
        assert tree(target) in (None, new) and hidden_siblings(target) == []
        return tree(target) is not None

    found = crash_matrix(tmp_path, mode, work, prepare, check)
    assert found[0] is False and found[-1] is True


@pytest.mark.parametrize("mode", MODES)
def test_discarding_a_folder_killed_at_every_step_leaves_it_whole_or_gone(tmp_path, mode):
    target = tmp_path / "state"
    old = version(0, size=100)

    def prepare():
        files._remove(target)
        target.mkdir()
        fill(target, old)

    def check():
        recover_folder(target)
        assert tree(target) in (None, old) and hidden_siblings(target) == []
        return tree(target) is None

    found = crash_matrix(tmp_path, mode, lambda step: discard_folder(target), prepare, check)
    assert found[0] is False and found[-1] is True


# ---- atomic_folder: kill -9 at random moments ------------------------------------------------
def random_kills(rounds: int, loop, check, seed: int = 0) -> list:
    """Start ``loop(ready)`` in a child (it calls ``ready()`` once it has written one version,
    then writes versions forever), SIGKILL it after a random moment (up to about three versions'
    writing time later), ``check()``; ``rounds`` times. The findings."""
    rng = random.Random(seed)
    found = []
    for _ in range(rounds):
        read_end, write_end = os.pipe()

        def child(read_end=read_end, write_end=write_end):
            os.close(read_end)
            loop(lambda: os.write(write_end, b"x"))

        start = time.perf_counter()
        pid = in_child(child)
        os.close(write_end)
        assert os.read(read_end, 1) == b"x", "the writer died before it was ready"
        os.close(read_end)
        one_version = time.perf_counter() - start
        time.sleep(rng.uniform(0.0, max(0.02, 3 * one_version)))
        os.kill(pid, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        found.append(check())
    return found


@pytest.mark.parametrize("mode", MODES)
def test_folder_writer_killed_at_random_moments(tmp_path, mode):
    target = tmp_path / "folder"
    versions = {g: version(g, size=20_000) for g in range(2)}  # ~400 KB each

    def loop(ready):
        use_mode(mode)
        for generation in range(10**9):
            with atomic_folder(target) as tmp:
                fill(tmp, versions[generation % 2])
            if generation == 0:
                ready()

    def check():
        recover_folder(target)
        found = tree(target)
        assert found in versions.values(), "half a folder"
        assert hidden_siblings(target) == []
        return found == versions[1]

    found = random_kills(25, loop, check)
    assert len(set(found)) == 2  # the kills hit both versions: the writer was really replacing


@pytest.mark.parametrize("mode", MODES)
def test_patch_save_killed_at_random_moments_loads_the_old_or_the_new_patch(tmp_path, mode):
    target = tmp_path / "edit.patch"

    def make(generation: int) -> Patch:
        request = EditRequest(prompt="The Eiffel Tower is in", subject="Eiffel Tower",
                              target_new=f"Rome{generation}")  # fmt: skip
        delta = ParameterDelta("w", (256, 256), dense=torch.full((256, 256), float(generation)))
        return Patch(method="ft", requests=[request], deltas=[delta], info={"gen": generation})

    patches = [make(0), make(1)]
    patches[0].save(target)

    def loop(ready):
        use_mode(mode)
        for generation in range(1, 10**9):
            patches[generation % 2].save(target)
            if generation == 1:
                ready()

    def check():
        loaded = Patch.load(target)  # a reader recovers an interrupted replacement itself
        generation = loaded.info["gen"]
        assert loaded.requests[0].target_new == f"Rome{generation}"
        assert torch.equal(loaded.deltas[0].dense, patches[generation].deltas[0].dense)
        assert hidden_siblings(target) == []
        return generation

    found = random_kills(12, loop, check, seed=1)
    assert set(found) == {0, 1}


# ---- the writers use it ----------------------------------------------------------------------
def failing_rename(monkeypatch, fail_at: int) -> None:
    """The fallback (no renameat2), whose ``fail_at``-th rename raises as a crash would stop it."""
    monkeypatch.setattr(files, "_renameat2_fn", False)
    calls = [0]
    real = os.rename

    def rename(*args, **kwargs):
        calls[0] += 1
        if calls[0] == fail_at:
            raise OSError("power cut")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)


def small_patch(target: str) -> Patch:
    request = EditRequest(
        prompt="The Eiffel Tower is in", subject="Eiffel Tower", target_new=target
    )
    delta = ParameterDelta("w", (2, 2), dense=torch.ones(2, 2))
    return Patch(method="ft", requests=[request], deltas=[delta])


@pytest.mark.parametrize("fail_at", [1, 2])
def test_patch_save_that_fails_mid_replacement_keeps_the_old_patch(tmp_path, monkeypatch, fail_at):
    """Saving over a patch once deleted the old folder before renaming the new one into place."""
    target = small_patch("Rome").save(tmp_path / "edit.patch")
    failing_rename(monkeypatch, fail_at)
    with pytest.raises(OSError, match="power cut"):
        small_patch("Berlin").save(target)
    monkeypatch.undo()
    assert Patch.load(target).requests[0].target_new == "Rome"
    assert hidden_siblings(target) == []
    small_patch("Berlin").save(target)
    assert Patch.load(target).requests[0].target_new == "Berlin"


def test_exchange_failure_keeps_the_old_patch(tmp_path, monkeypatch):
    target = small_patch("Rome").save(tmp_path / "edit.patch")

    def broken(a, b):
        raise OSError("power cut")

    monkeypatch.setattr(files, "_exchange", broken)
    with pytest.raises(OSError, match="power cut"):
        small_patch("Berlin").save(target)
    assert Patch.load(target).requests[0].target_new == "Rome"


def test_saving_over_a_folder_that_is_not_a_patch_is_refused(tmp_path):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("...")
    with pytest.raises(PatchError, match="not a saved patch"):
        small_patch("Rome").save(precious)
    assert (precious / "chapter1.tex").read_text() == "..."
    tiny = tiny_model("llama")
    with pytest.raises(PatchError, match="not an exported model"):
        Patch.from_deltas(tiny, "ft", [], []).export(tiny, precious)
    assert tree(precious) == {"chapter1.tex": b"..."}


def editor_for(lm, rank: int) -> MENDNetwork:
    name = lm.adapter.mlp_out_weight_name(1)
    return MENDNetwork({name: lm.adapter.matrix_shape(name)}, rank)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_editor_save_that_fails_mid_replacement_keeps_the_old_editor(
    tmp_path, monkeypatch, fail_at
):
    lm = tiny_model("llama")
    folder = save_editor(editor_for(lm, 2), lm, tmp_path / "editor")
    failing_rename(monkeypatch, fail_at)
    with pytest.raises(OSError, match="power cut"):
        save_editor(editor_for(lm, 3), lm, folder)
    monkeypatch.undo()
    assert read_editor_config(folder)["rank"] == 2
    assert load_editor(folder, lm).rank == 2
    save_editor(editor_for(lm, 3), lm, folder)
    assert load_editor(folder, lm).rank == 3 and hidden_siblings(folder) == []
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(EditorCheckpointError, match="not a saved editor"):
        save_editor(editor_for(lm, 2), lm, other)
    assert tree(other) == {"todo.txt": b"x"}


def test_export_is_written_whole(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    name = lm.adapter.mlp_out_weight_name(1)
    delta = ParameterDelta(name, tuple(lm.adapter.matrix_shape(name)), dense=None,
                           left=torch.ones(lm.adapter.matrix_shape(name)[0], 1),
                           right=torch.ones(1, lm.adapter.matrix_shape(name)[1]))  # fmt: skip
    patch = Patch.from_deltas(lm, "ft", [], [delta])
    folder = patch.export(lm, tmp_path / "edited")
    first = tree(folder)
    assert "config.json" in first and "lmscalpel_patch.json" in first
    failing_rename(monkeypatch, 2)
    with pytest.raises(OSError, match="power cut"):
        patch.export(lm, folder)
    monkeypatch.undo()
    recover_folder(folder)
    assert tree(folder) == first


def test_converting_a_gguf_is_written_whole_and_once(tmp_path, monkeypatch):
    """The conversion (mocked: a tiny model stands for the dequantized GGUF) lands whole; a
    conversion that dies half-way leaves no folder that looks converted; the next load reuses."""
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    gguf = tmp_path / "toy.Q4.gguf"
    gguf.write_bytes(os.urandom(1000))
    lm = tiny_model("llama")
    conversions = []

    class FakeModel:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            conversions.append(args)
            return lm.model

    class FakeTokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return lm.tokenizer

    monkeypatch.setattr(loading, "AutoModelForCausalLM", FakeModel)
    monkeypatch.setattr(loading, "AutoTokenizer", FakeTokenizer)
    real_save = type(lm.tokenizer).save_pretrained

    def dies(self, folder, *args, **kwargs):
        (Path(folder) / "half.json").write_text("{")
        raise RuntimeError("killed")

    monkeypatch.setattr(type(lm.tokenizer), "save_pretrained", dies)
    with pytest.raises(RuntimeError, match="killed"):
        loading.convert_gguf(gguf)
    target = loading.converted_gguf_dir(gguf)
    assert not target.exists() and hidden_siblings(target) == []
    monkeypatch.setattr(type(lm.tokenizer), "save_pretrained", real_save)
    target.mkdir(parents=True)  # e.g. an older, broken attempt: no config.json
    (target / "junk").write_text("x")
    assert loading.convert_gguf(gguf) == target
    assert (target / "config.json").is_file() and not (target / "junk").exists()
    assert json.loads((target / "config.json").read_text())["model_type"] == "llama"
    done = len(conversions)
    assert loading.convert_gguf(gguf) == target and len(conversions) == done  # reused


# ---- atomic_folder: the rules ------------------------------------------------------------------
def test_a_failing_block_leaves_the_old_folder_and_no_leftovers(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    fill(target, version(0))
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        fill(tmp, version(1))
        raise RuntimeError("changed my mind")
    assert tree(target) == version(0) and hidden_siblings(target) == []


def test_replace_false_keeps_what_is_there(tmp_path):
    target = tmp_path / "cache"
    with atomic_folder(target, replace=False) as tmp:
        fill(tmp, version(0))
    with atomic_folder(target, replace=False) as tmp:
        fill(tmp, version(1))
    assert tree(target) == version(0) and hidden_siblings(target) == []


def test_a_file_in_the_way_is_not_replaced(tmp_path):
    target = tmp_path / "folder"
    target.write_text("a file")
    with pytest.raises(NotADirectoryError), atomic_folder(target) as tmp:
        fill(tmp, version(0))
    assert target.read_text() == "a file" and hidden_siblings(target) == []


def test_recovery_leaves_live_and_foreign_writers_alone(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    stamp = f"{time.time_ns():016x}"
    live = tmp_path / f".folder.tmp-{stamp}-{files._HOST}-{os.getppid()}-aaaaaa"
    foreign = tmp_path / f".folder.tmp-{stamp}-ffffff-1-bbbbbb"
    pid = in_child(lambda: None)
    wait(pid)  # a process that has ended
    dead = tmp_path / f".folder.tmp-{stamp}-{files._HOST}-{pid}-cccccc"
    for folder in (live, foreign, dead):
        folder.mkdir()
    recover_folder(target)
    assert live.exists() and foreign.exists() and not dead.exists()


def test_an_old_copy_is_put_back_when_the_new_folder_never_arrived(tmp_path):
    target = tmp_path / "folder"
    aside = tmp_path / f".folder.old-{time.time_ns():016x}-{files._HOST}-1-aaaaaa"
    aside.mkdir()
    fill(aside, version(0))
    recover_folder(target)
    assert tree(target) == version(0) and hidden_siblings(target) == []
