"""The service's journal: written before an edit is acknowledged, replayed on start, refused for
another model, and left clean by a writer that died."""

from __future__ import annotations

import json

import pytest
import torch

from lmscalpel.service import EditingService, JournalError
from lmscalpel.service import journal as journal_module
from lmscalpel.service.engine import ServiceError
from lmscalpel.testing import tiny_model
from lmscalpel.testing import weight_copy as weights

REQUEST = {
    "prompt": "The Eiffel Tower is located in the city of",
    "subject": "Eiffel Tower",
    "target_new": "Rome",
    "target_true": "Paris",
}
OTHER = {
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
}


def config(layer):
    return {"lr": 0.05, "steps": 10, "norm_constraint": 5.0, "layers": [layer]}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture
def folder(tmp_path):
    return tmp_path / "journal"


def history(folder):
    """Three edits, one reverted on its own, one rejected by its guard; the service is closed."""
    service = EditingService(tiny_model("llama"), folder)
    first = service.edit("ft-l", [REQUEST], config(0))
    second = service.edit("ft-l", [OTHER], config(3))
    third = service.edit("ft-l", [REQUEST], config(0), note="again")
    service.revert(second["id"])
    with pytest.raises(ServiceError):
        service.edit(
            "ft-l",
            [OTHER],
            config(1),
            guard={
                "min_reliability": 1.0,
                "min_locality": 0,
                "general_prompts": ["Apple was"],
                "max_general_changed": 0,
                "general_tokens": 8,
            },
        )
    state = weights(service.lm), service.state(), service.edits()
    service.close()
    return (first, second, third), state


def test_replay_brings_a_fresh_model_to_the_journaled_state(folder):
    (first, _, third), (edited, state, listed) = history(folder)
    assert state["applied"] == [first["id"], third["id"]]
    fresh = tiny_model("llama")
    assert not same(weights(fresh), edited)
    service = EditingService(fresh, folder)
    assert service.state() == state
    assert same(weights(fresh), edited)
    assert service.edits() == listed
    statuses = [e["status"] for e in listed["edits"]]
    assert statuses == ["applied", "reverted", "applied", "rejected"]
    # and it goes on from there: a revert after the restart
    service.revert(third["id"], cascade=True)
    assert service.state()["applied"] == [first["id"]]
    service.close()


def test_each_entry_is_on_disk_before_the_edit_is_returned(folder, monkeypatch):
    service = EditingService(tiny_model("llama"), folder)
    seen = []
    real = journal_module.Journal._append

    def spy(self, entry):
        written = real(self, entry)
        path = folder / "entries" / f"{written['seq']:06d}.json"
        seen.append(json.loads(path.read_text())["id"])
        return written

    monkeypatch.setattr(journal_module.Journal, "_append", spy)
    done = service.edit("ft-l", [REQUEST], config(0))
    assert seen == [done["id"]]
    assert (folder / "patches" / done["id"] / "patch.json").is_file()
    service.close()


def test_a_journal_for_another_model_is_refused(folder):
    history(folder)
    with pytest.raises(JournalError, match="belongs to model"):
        EditingService(tiny_model("llama", seed=1), folder)


def test_a_second_server_on_the_same_journal_is_refused(folder):
    service = EditingService(tiny_model("llama"), folder)
    with pytest.raises(JournalError, match="in use"):
        EditingService(tiny_model("llama"), folder)
    service.close()
    EditingService(tiny_model("llama"), folder).close()  # free again


def test_a_folder_that_is_not_a_journal_is_refused(folder):
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(JournalError, match="not a journal"):
        EditingService(tiny_model("llama"), folder)
    assert (folder / "thesis.tex").read_text() == "precious"


def test_leftovers_of_a_dead_writer_are_removed_and_the_edit_never_happened(folder):
    history(folder)
    # a patch saved whose entry was never written (killed in between), and a half-written entry
    orphan = folder / "patches" / "e000099-deadbeef"
    orphan.mkdir()
    (orphan / "patch.json").write_text("{}")
    temp = folder / "entries" / ".000006.json.tmp-123-abc"
    temp.write_text('{"seq": 6, "op": "ed')
    service = EditingService(tiny_model("llama"), folder)
    assert not orphan.exists() and not temp.exists()
    assert len(service.journal.entries) == 5
    service.close()


@pytest.mark.parametrize("damage", ["patch", "entry", "gap", "weights"])
def test_a_damaged_journal_is_refused_naming_the_entry(folder, damage):
    (first, _, _), _ = history(folder)
    if damage == "patch":
        meta = folder / "patches" / first["id"] / "patch.json"
        meta.write_text(meta.read_text().replace('"ft-l"', '"ft-m"'))
    elif damage == "entry":
        (folder / "entries" / "000002.json").write_text("{broken")
    elif damage == "gap":
        (folder / "entries" / "000002.json").unlink()
    else:
        path = folder / "entries" / "000001.json"
        entry = json.loads(path.read_text())
        name = next(iter(entry["digests"]["after"]))
        entry["digests"]["after"][name] = "0" * 64
        entry["digests"].pop("patch")
        path.write_text(json.dumps(entry))
    with pytest.raises(JournalError) as caught:
        EditingService(tiny_model("llama"), folder)
    assert str(folder) in str(caught.value)


def test_an_edit_that_cannot_be_journaled_is_rolled_back(folder, monkeypatch):
    service = EditingService(tiny_model("llama"), folder)
    saved = weights(service.lm)

    def full_disk(self, entry):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.Journal, "_append", full_disk)
    with pytest.raises(ServiceError) as caught:
        service.edit("ft-l", [REQUEST], config(0))
    assert caught.value.status == 500 and "No space left" in caught.value.message
    assert same(weights(service.lm), saved)
    assert service.state() == {"version": 0, "applied": []}
    assert list((folder / "patches").iterdir()) == []
    service.close()


def test_a_revert_that_cannot_be_journaled_leaves_the_edits_applied(folder, monkeypatch):
    service = EditingService(tiny_model("llama"), folder)
    one = service.edit("ft-l", [REQUEST], config(0))
    two = service.edit("ft-l", [REQUEST], config(0))
    edited = weights(service.lm)
    monkeypatch.setattr(journal_module.Journal, "_append", lambda self, entry: 1 / 0)
    with pytest.raises(ServiceError):
        service.revert(one["id"], cascade=True)
    assert same(weights(service.lm), edited)
    assert service.state()["applied"] == [one["id"], two["id"]]
    service.close()
