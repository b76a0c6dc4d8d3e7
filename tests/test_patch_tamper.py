"""Tamper-evident patches (issue 15, item 3): every tampering of a saved patch is refused by
``Patch.load`` with a ``PatchError`` (never a raw KeyError / JSONDecodeError / AttributeError /
SafetensorError), a pickle is never unpickled, HMAC-SHA256 signatures prove provenance, format-1
patches load only when asked to, and a save over an existing patch interrupted at any step leaves
the old patch or the new one.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmscalpel import EditRequest, Patch, PatchError, PatchMismatchError
from lmscalpel.core import files
from lmscalpel.models import rewriters
from lmscalpel.models.fingerprint import tensor_digest
from lmscalpel.patch import (
    KEY_ENV,
    META_FILE,
    TENSOR_FILE,
    NonFiniteDeltaError,
    ParameterDelta,
    delta_sha256,
)

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome"
)


def make_patch(lm, target: str = "Rome") -> Patch:
    """Two deltas: a rank-one one on layer 1 and a dense one on layer 2."""
    torch.manual_seed(0)
    one, two = (lm.adapter.mlp_out_weight_name(layer) for layer in (1, 2))
    rows, cols = lm.model.get_parameter(one).shape
    deltas = [
        ParameterDelta.from_low_rank(one, torch.randn(rows, 1), torch.randn(1, cols)),
        ParameterDelta.from_dense(two, torch.randn(rows, cols) * 0.1),
    ]
    request = EditRequest(prompt=REQUEST.prompt, subject=REQUEST.subject, target_new=target)
    return Patch.from_deltas(lm, "test", [request], deltas, {"lr": 0.5, "layers": [1, 2]})


@pytest.fixture
def saved(tmp_path, tiny):
    return make_patch(tiny).save(tmp_path / "edit.patch")


# ---- tamperings --------------------------------------------------------------------------------
def edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors in memory (a memory map of a file rewritten in place would crash)."""
    return {k: v.clone() for k, v in load_file(str(folder / TENSOR_FILE)).items()}


def edit_tensors(folder: Path, change) -> None:
    tensors = read_tensors(folder)
    change(tensors)
    save_file(tensors, str(folder / TENSOR_FILE))


def flip_data_byte(folder: Path) -> None:
    raw = bytearray((folder / TENSOR_FILE).read_bytes())
    raw[-5] ^= 0x40  # inside the last tensor's data
    (folder / TENSOR_FILE).write_bytes(bytes(raw))


def flip_header_byte(folder: Path) -> None:
    raw = bytearray((folder / TENSOR_FILE).read_bytes())
    raw[12] ^= 0xFF
    (folder / TENSOR_FILE).write_bytes(bytes(raw))


def write_nan(tensors):
    key = next(k for k in tensors if k.endswith("::dense"))
    tensors[key][0, 0] = float("nan")


def scale_factors(tensors):
    for key in tensors:
        if key.endswith("::left"):
            tensors[key] *= 100


def zero(tensors):
    for key in tensors:
        tensors[key].zero_()


def retarget_in_json(meta):
    meta["parameters"][0]["name"] = meta["parameters"][0]["name"].replace(".1.", ".3.")


def retarget_both(folder: Path) -> None:
    """Move the layer-1 delta to layer 3 consistently in patch.json and the tensor file."""
    edit_meta(folder, retarget_in_json)
    edit_tensors(
        folder,
        lambda t: t.update({k.replace(".1.", ".3."): t.pop(k) for k in list(t) if ".1." in k}),
    )


def swap_names(meta):
    first, second = meta["parameters"][:2]
    first["name"], second["name"] = second["name"], first["name"]


def pickle_instead(folder: Path) -> None:
    tensors = read_tensors(folder)
    torch.save(tensors, folder / TENSOR_FILE)


TAMPERINGS = {
    "byte flipped in the delta data": flip_data_byte,
    "byte flipped in the safetensors header": flip_header_byte,
    "NaN written into a delta": lambda f: edit_tensors(f, write_nan),
    "factors scaled x100": lambda f: edit_tensors(f, scale_factors),
    "deltas zeroed": lambda f: edit_tensors(f, zero),
    "delta stored as float64": lambda f: edit_tensors(
        f, lambda t: t.update({k: v.double() for k, v in t.items()})
    ),
    "extra tensor": lambda f: edit_tensors(f, lambda t: t.update({"x::dense": torch.zeros(2)})),
    "tensor file deleted": lambda f: (f / TENSOR_FILE).unlink(),
    "truncated safetensors": lambda f: (f / TENSOR_FILE).write_bytes(
        (f / TENSOR_FILE).read_bytes()[:-100]
    ),
    "truncated safetensors header": lambda f: (f / TENSOR_FILE).write_bytes(
        (f / TENSOR_FILE).read_bytes()[:6]
    ),
    "pickle instead of safetensors": pickle_instead,
    "delta re-targeted in patch.json": lambda f: edit_meta(f, retarget_in_json),
    "delta re-targeted in both files": retarget_both,
    "two deltas' names swapped": lambda f: edit_meta(f, swap_names),
    "parameter listed twice": lambda f: edit_meta(
        f, lambda m: m["parameters"].append(m["parameters"][0])
    ),
    "shape changed": lambda f: edit_meta(
        f, lambda m: m["parameters"][1].update(shape=[m["parameters"][1]["shape"][0], 1])
    ),
    "rank changed": lambda f: edit_meta(f, lambda m: m["parameters"][1].update(rank=1)),
    "delta digest removed": lambda f: edit_meta(f, lambda m: m["parameters"][0].pop("sha256")),
    "missing key: method": lambda f: edit_meta(f, lambda m: m.pop("method")),
    "missing key: parameters": lambda f: edit_meta(f, lambda m: m.pop("parameters")),
    "missing key: name": lambda f: edit_meta(f, lambda m: m["parameters"][0].pop("name")),
    "missing key: digests": lambda f: edit_meta(f, lambda m: m.pop("digests")),
    "mistyped: parameters is an object": lambda f: edit_meta(
        f, lambda m: m.update(parameters={"a": 1})
    ),
    "mistyped: a parameter is a string": lambda f: edit_meta(
        f, lambda m: m.update(parameters=["x"])
    ),
    "mistyped: requests hold a number": lambda f: edit_meta(f, lambda m: m.update(requests=[5])),
    "mistyped: format_version": lambda f: edit_meta(f, lambda m: m.update(format_version="2")),
    "newer format": lambda f: edit_meta(f, lambda m: m.update(format_version=99)),
    "request changed": lambda f: edit_meta(
        f, lambda m: m["requests"][0].update(target_new="Berlin")
    ),
    "hyperparameters changed": lambda f: edit_meta(
        f, lambda m: m["hyperparameters"].update(lr=5.0)
    ),
    "not JSON": lambda f: (f / META_FILE).write_text("{this is not json"),
    "not UTF-8": lambda f: (f / META_FILE).write_bytes(b"\xff\xfe{}"),
    "empty patch.json": lambda f: (f / META_FILE).write_text(""),
    "JSON list": lambda f: (f / META_FILE).write_text("[1, 2, 3]"),
    "JSON string": lambda f: (f / META_FILE).write_text('"lmscalpel-patch"'),
    "deeply nested JSON": lambda f: (f / META_FILE).write_text("[" * 100_000 + "]" * 100_000),
    "not an lmscalpel patch": lambda f: edit_meta(f, lambda m: m.update(format="other")),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_every_tampering_is_refused_with_a_patch_error(saved, tampering):
    Patch.load(saved)  # intact, it loads
    TAMPERINGS[tampering](saved)
    with pytest.raises(PatchError) as refused:
        Patch.load(saved)
    assert str(refused.value)


def test_the_refusals_say_what_is_wrong(saved):
    edit_tensors(saved, scale_factors)
    with pytest.raises(PatchError, match="does not match its recorded SHA-256"):
        Patch.load(saved)
    pickle_instead(saved)
    with pytest.raises(PatchError, match="pickle.*never unpickles"):
        Patch.load(saved)


def test_a_pickle_is_never_unpickled(saved, monkeypatch):
    pickle_instead(saved)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    import pickle

    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads was called"))
    with pytest.raises(PatchError, match="pickle"):
        Patch.load(saved)


def test_an_intact_patch_roundtrips_with_its_digests(saved, tiny):
    meta = json.loads((saved / META_FILE).read_text())
    assert meta["format_version"] == 2
    assert set(meta["digests"]) == {
        "requests_sha256",
        "hyperparameters_sha256",
        "context_state_sha256",
    }
    assert set(meta["parameters"][0]["sha256"]) == {"left", "right"}
    assert set(meta["parameters"][1]["sha256"]) == {"dense"}
    loaded = Patch.load(saved)
    original = make_patch(tiny)
    for a, b in zip(loaded.deltas, original.deltas):
        assert a.name == b.name and torch.equal(a.materialize(), b.materialize())
    assert loaded.base_digests == original.base_digests and loaded.requests == original.requests
    before = tensor_digest(tiny.model.get_parameter(original.parameter_names[1]))
    loaded.apply(tiny)
    loaded.revert()
    assert tensor_digest(tiny.model.get_parameter(original.parameter_names[1])) == before


def test_a_consistent_retarget_is_refused_at_load_and_a_changed_base_digest_at_apply(saved, tiny):
    retarget_both(saved)
    with pytest.raises(PatchError, match="recorded SHA-256"):
        Patch.load(saved)
    make_patch(tiny).save(saved)
    edit_meta(saved, lambda m: m["parameters"][0].update(base_sha256="0" * 64))
    loaded = Patch.load(saved)  # not covered by a digest; only a signature covers it ...
    with pytest.raises(PatchMismatchError):  # ... and apply refuses it
        loaded.apply(tiny)


# ---- signatures --------------------------------------------------------------------------------
def test_a_signed_patch_loads_with_its_key_only(tmp_path, tiny):
    folder = make_patch(tiny).save(tmp_path / "signed.patch", key="s3cret")
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["signature"]["algorithm"] == "HMAC-SHA256"
    assert Patch.load(folder, key="s3cret").method == "test"
    assert Patch.load(folder, key=b"s3cret").method == "test"
    Patch.load(folder)  # without a key: the digests are still checked
    with pytest.raises(PatchError, match="signature does not match"):
        Patch.load(folder, key="wrong")


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["parameters"][0].update(base_sha256="0" * 64),
        lambda m: m["info"].update(note="x"),
        lambda m: m.update(model_name="other"),
        lambda m: m["signature"].update(value="0" * 64),
        lambda m: m.update(signature="yes"),
    ],
)
def test_a_signed_patch_changed_after_signing_is_refused(tmp_path, tiny, change):
    folder = make_patch(tiny).save(tmp_path / "signed.patch", key="s3cret")
    edit_meta(folder, change)
    with pytest.raises(PatchError, match="signature"):
        Patch.load(folder, key="s3cret")


def test_a_re_signed_or_unsigned_patch_is_refused_when_a_key_is_required(tmp_path, tiny):
    folder = make_patch(tiny).save(tmp_path / "other.patch", key="attacker")
    with pytest.raises(PatchError, match="signature does not match"):
        Patch.load(folder, key="s3cret")
    unsigned = make_patch(tiny).save(tmp_path / "unsigned.patch")
    with pytest.raises(PatchError, match="not signed"):
        Patch.load(unsigned, key="s3cret")


def test_the_key_can_come_from_the_environment(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "from-env")
    folder = make_patch(tiny).save(tmp_path / "env.patch")
    assert "signature" in json.loads((folder / META_FILE).read_text())
    Patch.load(folder)
    with pytest.raises(PatchError, match="signature does not match"):
        Patch.load(folder, key="other")
    monkeypatch.delenv(KEY_ENV)
    unsigned = make_patch(tiny).save(tmp_path / "unsigned.patch")
    monkeypatch.setenv(KEY_ENV, "from-env")
    with pytest.raises(PatchError, match="not signed"):
        Patch.load(unsigned)


@pytest.mark.parametrize("key", ["", b"", 5])
def test_a_bad_key_is_a_patch_error(tmp_path, tiny, key):
    with pytest.raises(PatchError, match="key"):
        make_patch(tiny).save(tmp_path / "x.patch", key=key)


# ---- format 1 ----------------------------------------------------------------------------------
def as_format_1(meta):
    meta["format_version"] = 1
    meta.pop("digests")
    for entry in meta["parameters"]:
        entry.pop("sha256")
        entry.pop("dtype")


def test_a_format_1_patch_loads_only_when_asked(saved, tiny):
    edit_meta(saved, as_format_1)
    with pytest.raises(PatchError, match="allow_unverified=True"):
        Patch.load(saved)
    loaded = Patch.load(saved, allow_unverified=True)
    loaded.apply(tiny)
    loaded.revert()
    loaded.save(saved)  # saving upgrades it
    assert json.loads((saved / META_FILE).read_text())["format_version"] == 2
    Patch.load(saved)


def test_a_format_1_patch_is_still_checked_for_shape(saved):
    edit_meta(saved, as_format_1)
    edit_meta(saved, lambda m: m["parameters"].append(m["parameters"][0]))
    with pytest.raises(PatchError, match="more than once"):
        Patch.load(saved, allow_unverified=True)


# ---- in-context patches ------------------------------------------------------------------------
@pytest.fixture
def echo_method():
    rewriters.register_rewriter("test-echo-tamper", lambda patches, lm: None)
    yield "test-echo-tamper"
    rewriters._BUILDERS.pop("test-echo-tamper")


def test_an_in_context_patch_roundtrips_and_its_state_is_covered(tmp_path, tiny, echo_method):
    patch = Patch.in_context(tiny, echo_method, [REQUEST], {"facts": ["a"]})
    folder = patch.save(tmp_path / "ctx.patch")
    assert Patch.load(folder).context_state == {"facts": ["a"]}
    edit_meta(folder, lambda m: m["context_state"]["facts"].append("b"))
    with pytest.raises(PatchError, match="context_state"):
        Patch.load(folder)


# ---- crash-safe saves, deterministic -----------------------------------------------------------
STEPS = ["fsync_path", "_rename2", "_remove"]


def hidden(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_save_over_a_patch_interrupted_at_every_step_leaves_old_or_new(
    tmp_path, tiny, monkeypatch, mode, error
):
    """Each flush, rename and delete of the folder swap raises in turn (in-process; the real
    ``kill -9`` campaigns are in tests/test_files.py and tests/test_kill_*.py)."""
    target = make_patch(tiny, "Rome").save(tmp_path / "edit.patch")
    new = make_patch(tiny, "Berlin")
    found = []
    for at in range(1, 100):
        calls = [0]

        def step(real, at=at, calls=calls):
            def wrapped(*args, **kwargs):
                calls[0] += 1
                if calls[0] == at:
                    raise error("power cut")
                return real(*args, **kwargs)

            return wrapped

        with monkeypatch.context() as m:
            if mode == "fallback":
                m.setattr(files, "_renameat2_fn", False)
            for name in STEPS:
                m.setattr(files, name, step(getattr(files, name)))
            m.setattr(files.os, "rename", step(files.os.rename))
            try:
                new.save(target)
                done = True
            except (KeyboardInterrupt, OSError):
                done = False
        files.recover_folder(target)
        loaded = Patch.load(target)
        found.append(loaded.requests[0].target_new)
        assert found[-1] in ("Rome", "Berlin")
        # a fault inside the final delete leaves this (live) process's copy: removed once the
        # process is gone; nothing else is ever left
        left = [n for n in hidden(target) if f"-{os.getpid()}-" not in n]
        assert left == [], f"leftovers after a fault at step {at}: {left}"
        for name in hidden(target):
            files._remove(target.parent / name)
        if done:
            break
        make_patch(tiny, "Rome").save(target)
    assert found[-1] == "Berlin" and "Rome" in found and len(found) > 3


def test_a_nan_delta_with_recomputed_digests_is_still_refused(saved):
    """An attacker who rewrites the digests too still cannot get a non-finite delta in."""
    tensors = read_tensors(saved)
    key = next(k for k in tensors if k.endswith("::dense"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(saved / TENSOR_FILE))

    def recompute(meta):
        for entry in meta["parameters"]:
            for role in entry["sha256"]:
                name = f"{entry['name']}::{role}"
                entry["sha256"][role] = delta_sha256(name, tensors[name])

    edit_meta(saved, recompute)
    with pytest.raises(NonFiniteDeltaError, match="not finite"):
        Patch.load(saved)


# ---- extra tensors (e.g. AlphaEdit's keys of earlier edits) -----------------------------------
def test_extra_tensors_roundtrip_and_are_covered_by_digests(tmp_path, tiny):
    base = make_patch(tiny)
    keys = torch.randn(3, 8)
    patch = Patch.from_deltas(tiny, "test", base.requests, base.deltas, extras={"keys.1": keys})
    folder = patch.save(tmp_path / "extras.patch")
    loaded = Patch.load(folder)
    assert set(loaded.extras) == {"keys.1"} and torch.equal(loaded.extras["keys.1"], keys)
    only = Patch("test", [REQUEST], extras={"keys.1": keys}).save(tmp_path / "only.patch")
    assert torch.equal(Patch.load(only).extras["keys.1"], keys)  # no deltas, still written
    edit_tensors(folder, lambda t: t["extra::keys.1"].mul_(2))
    with pytest.raises(PatchError, match="extra tensor 'keys.1'"):
        Patch.load(folder)
    patch.save(folder)
    edit_meta(folder, lambda m: m["extras"].pop("keys.1"))
    with pytest.raises(PatchError, match="unexpected"):
        Patch.load(folder)


@pytest.mark.parametrize(
    "extras,error",
    [
        ({"bad name/..": torch.zeros(1)}, "must match"),
        ({"k": torch.tensor([float("nan")])}, "not finite"),
        ({"k": [1.0]}, "not a tensor"),
    ],
)
def test_bad_extras_are_refused(extras, error):
    with pytest.raises(PatchError, match=error):
        Patch("test", [REQUEST], extras=extras)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_file_writer_killed_mid_write_leaves_nothing_that_accumulates(tmp_path):
    """atomic_path's temporary file carries its writer's pid: after a kill -9 the next write of
    the same file removes it (the old file stays whole meanwhile)."""
    target = tmp_path / "state.json"
    files.atomic_write_text(target, "old")
    for _ in range(3):
        pid = os.fork()
        if pid == 0:  # the child: write half a file, then die without cleaning up
            try:
                with files.atomic_path(target) as tmp:
                    tmp.write_text("half")
                    os.kill(os.getpid(), signal.SIGKILL)
            finally:
                os._exit(1)
        os.waitpid(pid, 0)
        assert target.read_text() in ("old", "new")
        assert len(hidden(target)) == 1  # the killed writer's temporary file
        files.atomic_write_text(target, "new")
        assert target.read_text() == "new" and hidden(target) == []
