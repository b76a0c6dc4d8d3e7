"""Crash-safe saves, proven with ``kill -9``: a child process saves over an existing file or folder
in a loop and is SIGKILLed at a random moment; afterwards the path must hold the complete old or
the complete new version (loaded and verified by lmscalpel's own reader, compared with what was
written), never nothing and never half, and no temporary sibling of a dead writer may remain.

One kind of file per test: weight patches of ROME (low-rank) and FT-L (dense), MEND editor
checkpoints, the converted-model cache (the dequantised embedded model, with a tiny model standing
in for the GGUF), key statistics (the disk cache) and run folders (cases, manifest, summary,
sequential state). Kills alternate between Linux's atomic exchange and the rename-aside fallback
of file systems without it. The default suite runs a few trials per kind; the slow suite runs
``SLOW_TRIALS`` and, with ``$LMSCALPEL_RELIABILITY_OUT`` set, writes the figures as
``kill_saves.json`` there (docs/reliability.md quotes them).

Each child is forked from the test process (which has already imported torch and built the
models), so a trial costs a few milliseconds of saving rather than seconds of imports; the child
runs torch single-threaded (the parent's OpenMP workers do not survive a fork).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from lmscalpel.core import files
from lmscalpel.core.files import atomic_folder, atomic_write_json, discard_folder, recover_folder
from lmscalpel.core.requests import EditRequest
from lmscalpel.editing import edit
from lmscalpel.evaluation.store import RunStore
from lmscalpel.mechanics.stats import STATISTICS, KeyStatistics
from lmscalpel.methods.mend.checkpoint import EditorCheckpointError, load_editor, save_editor
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.models import loading
from lmscalpel.patch import Patch
from lmscalpel.testing import tiny_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

FAST_TRIALS = 3
SLOW_TRIALS = int(os.environ.get("LMSCALPEL_KILL_TRIALS", "30"))
READY_TIMEOUT = 60.0  # seconds a child may take for its first save
REQUESTS = [
    EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                target_new=city, target_true="Paris")
    for city in ("Rome", "Berlin")
]  # fmt: skip


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---- the harness -----------------------------------------------------------------------------
class Torn(AssertionError):
    """What a kill left is not one whole version."""


@dataclass
class Kind:
    """One kind of saved thing: ``write(i)`` saves version ``i`` over ``path``; ``read()`` loads
    ``path`` with lmscalpel's reader and returns the index of the version it holds (None: absent,
    meaning lost), raising :class:`Torn` (or the reader's error) when it holds no whole version."""

    name: str
    path: Path
    versions: int
    write: Callable[[int], None]
    read: Callable[[], int | None]


@dataclass
class Tally:
    kind: str
    trials: int = 0
    old: int = 0
    new: int = 0
    lost: int = 0
    half: int = 0
    caught_mid_write: int = 0
    leftovers: int = 0
    saves_per_trial: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        saves = self.saves_per_trial
        return {
            "trials": self.trials,
            "complete_old": self.old,
            "complete_new": self.new,
            "lost": self.lost,
            "half_written": self.half,
            "kills_during_a_write": self.caught_mid_write,
            "leftover_temporaries": self.leftovers,
            "mean_saves_before_kill": sum(saves) / len(saves) if saves else 0,
            "errors": self.errors[:5],
        }


def hidden(folder: Path) -> list[str]:
    """The atomic writers' hidden siblings anywhere below ``folder`` (``.<name>.tmp-*`` etc.)."""
    found = []
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            if name.startswith(".") and any(f".{k}-" in name for k in ("tmp", "old", "trash")):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def use_fallback(on: bool) -> None:
    """In a child: the rename-aside fallback of systems without ``renameat2`` (or the exchange)."""
    files._renameat2_fn = False if on else None


def own_progress_bar_lock() -> None:
    """In a child: a lock of its own for tqdm (which transformers' ``save_pretrained`` uses).
    Forked children share the parent's process-wide tqdm semaphore, and one killed while holding
    it would leave every later child waiting forever (separate processes share no such lock)."""
    lock, classes = threading.RLock(), [tqdm]
    while classes:
        cls = classes.pop()
        cls.set_lock(lock)
        classes.extend(cls.__subclasses__())


def child_loop(kind: Kind, start: int, fallback: bool, ready: int, counter: Path) -> None:
    """The child: save version after version over ``kind.path`` until killed; ``ready`` hears
    once the first save is complete."""
    torch.set_num_threads(1)
    own_progress_bar_lock()
    use_fallback(fallback)
    for step in range(10**9):
        kind.write((start + 1 + step) % kind.versions)
        counter.write_text(str(step + 1))
        if step == 0:
            os.write(ready, b"x")


def kill_trials(kind: Kind, trials: int, seed: int = 0) -> Tally:
    """``trials`` times: fork a child that saves ``kind`` in a loop; once its first save is
    complete, SIGKILL it after a random delay (up to about three saves' time), then check what is
    left with lmscalpel's reader. Returns the tally."""
    rng = random.Random(seed)
    tally = Tally(kind.name)
    kind.write(0)
    current = kind.read()
    counter = kind.path.parent / f"{kind.name}.saves"
    for trial in range(trials):
        counter.write_text("0")
        read_end, write_end = os.pipe()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest
            try:
                os.close(read_end)
                child_loop(kind, current or 0, trial % 2 == 1, write_end, counter)
            finally:
                os._exit(1)
        os.close(write_end)
        heard, _, _ = select.select([read_end], [], [], READY_TIMEOUT)
        if not heard or os.read(read_end, 1) != b"x":
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the writer hung or died before its first save ({kind.name})")
        os.close(read_end)
        one_save = time.perf_counter() - start
        current = ((current or 0) + 1) % kind.versions  # what the first save wrote
        time.sleep(rng.uniform(0.0, 3 * one_save))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL, "the writer failed by itself"
        tally.trials += 1
        tally.saves_per_trial.append(int(counter.read_text() or 0))
        if hidden(kind.path.parent) or not os.path.lexists(kind.path):
            tally.caught_mid_write += 1
        try:
            found = kind.read()
        except Exception as error:  # a torn version: counted, reported below
            tally.half += 1
            tally.errors.append(f"trial {trial}: {type(error).__name__}: {error}")
            kind.write(0)
            found = 0
        else:
            if found is None:
                tally.lost += 1
                kind.write(0)
                found = 0
            elif found == current:
                tally.old += 1
            else:
                tally.new += 1
        left = hidden(kind.path.parent)
        if left:
            tally.leftovers += len(left)
            tally.errors.append(f"trial {trial}: left behind {left}")
        current = found
    return tally


def check(tally: Tally, slow: bool) -> None:
    assert tally.errors == [], tally.errors
    assert (tally.lost, tally.half, tally.leftovers) == (0, 0, 0)
    if slow:  # the kills really hit saves in progress, and both versions survive kills
        assert tally.caught_mid_write > 0
        assert tally.new > 0 and tally.old > 0
    _record(tally)


def _record(tally: Tally) -> None:
    out = os.environ.get("LMSCALPEL_RELIABILITY_OUT")
    if not out or tally.trials < SLOW_TRIALS:
        return
    path = Path(out) / "kill_saves.json"
    data = json.loads(path.read_text()) if path.is_file() else {"kinds": {}}
    data["kinds"][tally.kind] = tally.as_dict()
    data["measured"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data["totals"] = {
        key: sum(k[key] for k in data["kinds"].values())
        for key in ("trials", "lost", "half_written", "leftover_temporaries")
    }
    atomic_write_json(path, data)


# ---- the kinds -------------------------------------------------------------------------------
def patch_kind(tmp_path: Path, method: str) -> Kind:
    """Two real patches of ``method`` on a tiny model (ROME: low-rank; FT-L: dense)."""
    lm = tiny_model("llama", hidden=64)
    config = (
        {"layer": 1, "lr": 0.5, "max_steps": 4, "statistics": False, "prefixes": 0}
        if method == "rome"
        else {"layers": [1, 2], "lr": 0.05, "steps": 3}
    )
    patches = [edit(lm, r, method=method, config=config, apply=False) for r in REQUESTS]
    path = tmp_path / f"{method}.patch"

    def read() -> int | None:
        loaded = Patch.load(path)
        index = [r.target_new for r in REQUESTS].index(loaded.requests[0].target_new)
        expected = patches[index]
        assert [d.name for d in loaded.deltas] == [d.name for d in expected.deltas]
        for got, want in zip(loaded.deltas, expected.deltas):
            mine, theirs = got.tensors(), want.tensors()
            if mine.keys() != theirs.keys() or not all(
                torch.equal(mine[k], theirs[k]) for k in mine
            ):
                raise Torn(f"delta {got.name} is not the one saved")
        return index

    return Kind(f"patch-{method}", path, 2, lambda i: patches[i].save(path), read)


def editor_kind(tmp_path: Path) -> Kind:
    lm = tiny_model("llama", hidden=64)
    names = [lm.adapter.mlp_out_weight_name(layer) for layer in (1, 2)]
    shapes = {name: lm.adapter.matrix_shape(name) for name in names}
    networks = []
    for generation in range(2):
        torch.manual_seed(generation)
        network = MENDNetwork(shapes, rank=16)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.normal_()
        networks.append(network)
    path = tmp_path / "editor"

    def read() -> int | None:
        loaded = load_editor(path, lm).state_dict()
        for index, network in enumerate(networks):
            if all(torch.equal(loaded[k], v) for k, v in network.state_dict().items()):
                return index
        raise Torn("the editor's tensors are neither version")

    def write(i: int) -> None:
        save_editor(networks[i], lm, path, {"generation": i})

    return Kind("mend-editor", path, 2, write, read)


def converted_kind(tmp_path: Path, monkeypatch) -> Kind:
    """The dequantised-GGUF cache: converted once (kept whole or absent), discarded, converted
    again, in a loop; a tiny model stands in for what ``from_pretrained`` reads from the GGUF."""

    lm = tiny_model("llama", hidden=64)
    gguf = tmp_path / "toy.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)

    class FromGGUF:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return lm.model

    class TokenizerFromGGUF:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return lm.tokenizer

    monkeypatch.setattr(loading, "AutoModelForCausalLM", FromGGUF)
    monkeypatch.setattr(loading, "AutoTokenizer", TokenizerFromGGUF)
    target = loading.converted_gguf_dir(gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = {k: v.clone() for k, v in lm.model.state_dict().items()}

    def write(i: int) -> None:  # version 0: converted; version 1: discarded
        if i == 1:
            discard_folder(target)
        else:
            loading.convert_gguf(gguf)

    def read() -> int | None:
        recover_folder(target)
        if not target.exists():
            return 1  # discarded whole
        if not (target / "config.json").is_file():
            raise Torn(f"{target} exists without config.json")
        model = AutoModelForCausalLM.from_pretrained(target)
        state = model.state_dict()
        for name, tensor in expected.items():
            if name in state and not torch.equal(state[name], tensor):
                raise Torn(f"{name} differs from the converted weights")
        if loading.convert_gguf(gguf) != target:  # what a later load does: reuse it
            raise Torn("the converted folder is not reused")
        return 0

    return Kind("converted-model", target, 2, write, read)


def statistics_kind(tmp_path: Path) -> Kind:
    """Key statistics in the disk cache (a 384 x 384 float64 moment, ~1.2 MB, and metadata)."""
    key = ("fingerprint", "model.layers.1.mlp.down_proj.weight.corpus.1000")
    values = []
    for generation in range(2):
        torch.manual_seed(generation)
        keys = torch.randn(500, 384, dtype=torch.float64)
        meta = {"count": str(500 + generation), "layer": "1", "corpus": "corpus",
                "weight": "model.layers.1.mlp.down_proj.weight"}  # fmt: skip
        values.append(KeyStatistics(keys.T @ keys / 500, 500 + generation, 1, "corpus",
                                    metadata=meta))  # fmt: skip
    path = STATISTICS.path(key)

    def read() -> int | None:
        STATISTICS.forget()
        found = STATISTICS.load(key)
        if found is None:
            raise Torn(f"{path} is missing or unreadable")
        index = found.count - 500
        if not torch.equal(found.moment, values[index].moment):
            raise Torn("the moment is not the one saved with its count")
        return index

    return Kind("statistics", path, 2, lambda i: STATISTICS.save(key, values[i]), read)


def run_folder_kind(tmp_path: Path) -> Kind:
    """A run folder as the runner writes it: a case record appended, the manifest and summary
    replaced, the sequential state folder replaced and now and then cleared, per step. ``read``
    checks every file (records whole and in order) and that the folder reopens (resumes)."""
    root = tmp_path / "run"
    label = "ft-l"
    pad = "x" * 4000

    def write(i: int) -> None:
        store = RunStore(root)
        done = len(store.cases(label).read())
        store.write_manifest({"format": "lmscalpel-evaluation", "cases": done + 1, "pad": pad})
        store.cases(label).append({"key": f"case-{done}", "index": done, "pad": pad})
        with atomic_folder(store.state_dir(label)) as tmp:
            (tmp / "weights.safetensors").write_bytes(os.urandom(20_000))
            (tmp / "state.json").write_text(json.dumps({"done": done + 1}))
        atomic_write_json(root / "summary.json", {"cases": done + 1, "pad": pad})
        if done % 5 == 4:
            store.clear_state(label)

    def read() -> int | None:
        store = RunStore(root)  # what a resumed run opens
        records = store.cases(label).read()
        for index, record in enumerate(records):
            if record != {"key": f"case-{index}", "index": index, "pad": pad}:
                raise Torn(f"record {index} is not whole: {str(record)[:80]}")
        manifest = store.manifest()
        if manifest is None or manifest["pad"] != pad:
            raise Torn("run.json is missing or torn")
        if not manifest["cases"] - 1 <= len(records) <= manifest["cases"]:
            raise Torn(f"{len(records)} records for a manifest of {manifest['cases']}")
        state = store.state_dir(label)
        if state.exists():
            done = json.loads((state / "state.json").read_text())["done"]
            if len((state / "weights.safetensors").read_bytes()) != 20_000 or done > len(records):
                raise Torn("the state folder is torn")
        summary = json.loads((root / "summary.json").read_text())
        if summary["pad"] != pad:
            raise Torn("summary.json is torn")
        return len(records)

    return Kind("run-folder", root, 10**9, write, read)  # versions: the growing record count


KINDS = ["patch-rome", "patch-ft-l", "mend-editor", "converted-model", "statistics", "run-folder"]


def make_kind(name: str, tmp_path: Path, monkeypatch) -> Kind:
    if name.startswith("patch-"):
        return patch_kind(tmp_path, name.removeprefix("patch-"))
    if name == "mend-editor":
        return editor_kind(tmp_path)
    if name == "converted-model":
        return converted_kind(tmp_path, monkeypatch)
    if name == "statistics":
        return statistics_kind(tmp_path)
    return run_folder_kind(tmp_path)


@pytest.mark.parametrize("name", KINDS)
def test_a_save_killed_at_random_moments_leaves_the_old_or_the_new_version(
    name, tmp_path, monkeypatch
):
    check(kill_trials(make_kind(name, tmp_path, monkeypatch), FAST_TRIALS), slow=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", KINDS)
def test_many_kills_per_kind_lose_nothing(name, tmp_path, monkeypatch):
    check(kill_trials(make_kind(name, tmp_path, monkeypatch), SLOW_TRIALS, seed=1), slow=True)


# ---- what a reader does with a file that was torn anyway (by hand, by another tool) ------------
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ({"editor.json": b"[1, 2]"}, "not a MEND editor"),
        ({"editor.json": b'{"format": "lmscalpel-editor", "method": "mend"'}, "invalid JSON"),
        ({"editor.json": b"\xff\xfe"}, "invalid JSON"),
        ({"editor.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"}, "do not match"),
        ({"editor.safetensors": b"half"}, "do not match"),
    ],
)
def test_a_torn_editor_is_refused_with_one_clear_error(tmp_path, damage, message):
    kind = editor_kind(tmp_path)
    kind.write(0)
    for name, content in damage.items():
        (kind.path / name).write_bytes(content)
    with pytest.raises(EditorCheckpointError, match=message):
        kind.read()


def test_an_editor_json_with_fields_of_the_wrong_kind_is_refused(tmp_path):
    kind = editor_kind(tmp_path)
    kind.write(0)
    meta = json.loads((kind.path / "editor.json").read_text())
    for field_name, value in [("parameters", []), ("parameters", {"w": [0, 3]}), ("rank", "8"),
                              ("rank", True), ("model_fingerprint", None)]:  # fmt: skip
        (kind.path / "editor.json").write_text(json.dumps({**meta, field_name: value}))
        with pytest.raises(EditorCheckpointError, match=field_name):
            kind.read()
