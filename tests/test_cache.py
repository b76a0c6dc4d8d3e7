"""The one disk cache: what it computes, reads and remembers, and what it refuses to trust."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import pytest
import torch

from lmscalpel.core import cache as cache_module
from lmscalpel.core.cache import JSON, TENSORS, DiskCache, TensorFile, forget_all, tensor_codec


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class Counted:
    """A compute function that counts its calls."""

    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_computed_once_then_remembered_then_read_from_disk(home):
    cache = DiskCache("things", JSON)
    compute = Counted({"sigma": 0.25})
    assert cache.get(("model-abc", "sigma"), compute) == {"sigma": 0.25}
    assert (compute.calls, cache.computed, cache.loaded, cache.remembered) == (1, 1, 0, 0)
    path = home / "things" / "model-abc" / "sigma.json"
    assert cache.path(("model-abc", "sigma")) == path and json.loads(path.read_text()) == {
        "sigma": 0.25
    }

    assert cache.get(("model-abc", "sigma"), compute) == {"sigma": 0.25}  # memory
    assert (compute.calls, cache.computed, cache.loaded, cache.remembered) == (1, 1, 0, 1)

    cache.forget()  # as in a fresh process: only the file is left
    assert cache.get(("model-abc", "sigma"), compute) == {"sigma": 0.25}
    assert (compute.calls, cache.computed, cache.loaded, cache.remembered) == (1, 1, 1, 1)

    other = cache.get(("model-abc", "other"), Counted([1, 2]))  # another key is another value
    assert other == [1, 2] and cache.computed == 2


def test_a_fresh_cache_object_reads_what_another_wrote():
    DiskCache("things", JSON).save(("k",), {"x": 1})
    fresh = DiskCache("things", JSON)
    assert fresh.get(("k",), lambda: pytest.fail("recomputed")) == {"x": 1}
    assert (fresh.computed, fresh.loaded) == (0, 1)


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"\xff\xfe\x00"])
def test_an_unreadable_json_entry_is_recomputed_with_a_warning(home, caplog, garbage):
    cache = DiskCache("things", JSON)
    path = cache.path(("k",))
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="lmscalpel.core.cache"):
        assert cache.get(("k",), lambda: {"x": 1}) == {"x": 1}
    assert "unreadable cache entry" in caplog.text and str(path) in caplog.text
    assert cache.computed == 1 and json.loads(path.read_text()) == {"x": 1}  # repaired


def test_a_truncated_tensor_entry_is_recomputed_with_a_warning(caplog):
    cache = DiskCache("tensors", TENSORS)
    value = TensorFile({"moment": torch.arange(12.0).reshape(3, 4)}, {"count": "7"})
    path = cache.save(("fp", "layer1"), value)
    assert path.suffix == ".safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short
    cache.forget()
    with caplog.at_level(logging.WARNING, logger="lmscalpel.core.cache"):
        again = cache.get(("fp", "layer1"), lambda: value)
    assert again is value and "unreadable" in caplog.text and cache.computed == 2
    cache.forget()
    read = cache.load(("fp", "layer1"))
    assert torch.equal(read["moment"], value["moment"]) and read.metadata == {"count": "7"}


def test_an_entry_the_check_rejects_is_recomputed(caplog):
    cache = DiskCache("tensors", TENSORS)
    cache.save(("pool",), TensorFile({"embeddings": torch.zeros(2, 3)}))
    cache.forget()
    three_rows = lambda stored: stored["embeddings"].shape[0] == 3  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="lmscalpel.core.cache"):
        found = cache.get(("pool",), lambda: TensorFile({"embeddings": torch.ones(3, 3)}),
                          check=three_rows)  # fmt: skip
    assert found["embeddings"].shape == (3, 3) and "expected value" in caplog.text


def test_changing_lmscalpel_home_is_respected(tmp_path, monkeypatch):
    cache = DiskCache("things", JSON)
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv("LMSCALPEL_HOME", str(first))
    assert cache.get(("k",), lambda: "one") == "one"
    monkeypatch.setenv("LMSCALPEL_HOME", str(second))
    assert cache.path(("k",)) == second / "things" / "k.json"
    assert cache.get(("k",), lambda: "two") == "two"  # not the first root's remembered value
    assert (first / "things" / "k.json").is_file() and (second / "things" / "k.json").is_file()
    monkeypatch.setenv("LMSCALPEL_HOME", str(first))
    assert cache.get(("k",), lambda: pytest.fail("recomputed")) == "one"
    assert cache.computed == 2


def test_bad_keys_are_refused():
    cache = DiskCache("things", JSON)
    for key in [(), ("",), ("a/b",), ("..",), ("fp", "."), ("a\\b",)]:
        with pytest.raises(ValueError, match="bad cache key"):
            cache.path(key)


def test_a_decoded_value_is_remembered_itself():
    """A codec that decodes to a richer object: the memory keeps that object (with what it
    computed lazily), the disk keeps tensors and metadata."""

    class Moment:
        def __init__(self, tensor):
            self.tensor, self.factorised = tensor, None

    codec = tensor_codec(
        lambda m: TensorFile({"m": m.tensor}, {"kind": "moment"}),
        lambda stored, path: Moment(stored["m"]),
    )
    cache = DiskCache("moments", codec)
    made = cache.get(("a",), lambda: Moment(torch.eye(2)))
    made.factorised = "done once"
    assert cache.get(("a",), lambda: pytest.fail("recomputed")) is made
    cache.forget()
    read = cache.get(("a",), lambda: pytest.fail("recomputed"))
    assert read is not made and torch.equal(read.tensor, torch.eye(2)) and read.factorised is None


def test_table_entries_share_one_file_and_keep_each_other(home):
    cache = DiskCache("tracing", JSON)
    assert cache.entry(("std",), "model-a", lambda: 0.5) == 0.5
    assert cache.entry(("std",), "model-b", lambda: 0.7) == 0.7
    path = home / "tracing" / "std.json"
    assert json.loads(path.read_text()) == {"model-a": 0.5, "model-b": 0.7}
    assert cache.entry(("std",), "model-a", lambda: pytest.fail("recomputed")) == 0.5
    assert (cache.computed, cache.remembered) == (2, 1)
    # an entry another process added meanwhile is read, not recomputed
    path.write_text(json.dumps({"model-a": 0.5, "model-b": 0.7, "model-c": 0.9}))
    assert cache.entry(("std",), "model-c", lambda: pytest.fail("recomputed")) == 0.9
    # a table that is not a table is recomputed
    path.write_text("[1, 2]")
    cache.forget()
    assert cache.entry(("std",), "model-a", lambda: 0.5) == 0.5
    assert json.loads(path.read_text()) == {"model-a": 0.5}


def test_remember_false_reads_the_disk_every_time():
    cache = DiskCache("things", JSON, remember=False)
    cache.get(("k",), lambda: 1)
    cache.get(("k",), lambda: pytest.fail("recomputed"))
    assert (cache.loaded, cache.remembered) == (1, 0)


def test_forget_all_forgets_every_cache():
    a, b = DiskCache("a", JSON), DiskCache("b", JSON)
    a.get(("k",), lambda: 1)
    b.get(("k",), lambda: 2)
    forget_all()
    a.get(("k",), lambda: pytest.fail("recomputed"))
    b.get(("k",), lambda: pytest.fail("recomputed"))
    assert a.loaded == b.loaded == 1


def test_a_failed_write_leaves_the_old_entry(monkeypatch):
    cache = DiskCache("tensors", TENSORS)
    old = TensorFile({"t": torch.zeros(100)})
    path = cache.save(("k",), old)

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(cache_module, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        cache.save(("k",), TensorFile({"t": torch.ones(100)}))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left
    cache.forget()
    assert torch.equal(cache.load(("k",))["t"], torch.zeros(100))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_writer_killed_at_random_moments_never_leaves_a_torn_entry(home):
    """A child rewrites one entry with alternating values and is SIGKILLed at random moments;
    the entry is always one whole value."""
    cache = DiskCache("tensors", TENSORS)
    values = [TensorFile({"t": torch.full((200_000,), float(i))}) for i in range(2)]
    cache.save(("k",), values[0])
    for delay in [0.0, 0.003, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1]:
        pid = os.fork()
        if pid == 0:
            try:
                for i in range(10**9):
                    cache.save(("k",), values[i % 2])
            finally:
                os._exit(1)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        cache.forget()
        read = cache.load(("k",))
        assert read is not None, "a torn entry"
        first = float(read["t"][0])
        assert torch.equal(read["t"], values[int(first)]["t"])
    assert cache.computed == 1  # the child's saves counted in the child only
