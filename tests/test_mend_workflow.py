"""Training a MEND editor from a file and saving it with its record
(lmscalpel.methods.mend.workflow, what `lmscalpel train-editor` runs)."""

import json
import time

import pytest

from lmscalpel import EditRequest, LocalityProbe, save_requests
from lmscalpel.methods.mend import MENDTrainConfig, load_editor
from lmscalpel.methods.mend.workflow import SCORES, read_edit_records, train_editor
from lmscalpel.testing import tiny_model

CITIES = ("Paris", "Rome", "Tokyo", "London", "Berlin", "Madrid")
NAMES = ("Eiffel", "Apple", "Colosseum", "Danielle", "Michel", "Toko", "Larry", "Steve")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def records(n: int) -> list[EditRequest]:
    subjects = [f"{a} {b}" for a in NAMES for b in reversed(NAMES) if a != b]
    return [
        EditRequest(
            prompt="{} is located in the city of",
            subject=subjects[i],
            target_new=CITIES[i % len(CITIES)],
            paraphrases=("Where is {}? It is in the city of",),
            locality=(LocalityProbe(f"{subjects[i + 1]} is located in the city of", "Paris"),),
        )
        for i in range(n)
    ]


def test_records_come_from_any_benchmark_file_and_bad_ones_are_listed(tmp_path):
    path = tmp_path / "records.jsonl"
    save_requests(records(5), path)
    with path.open("a") as f:
        f.write(json.dumps({"prompt": "no subject here"}) + "\n")
    got = read_edit_records(path)
    assert [r.subject for r in got.requests] == [r.subject for r in records(5)]
    assert got.layout == "requests" and got.source == path
    assert len(got.problems) == 1 and got.problems[0].index == 5


def test_train_editor_saves_a_loadable_editor_with_its_training_record(tmp_path):
    lm = tiny_model("llama")
    path = tmp_path / "records.jsonl"
    save_requests(records(24), path)
    config = MENDTrainConfig(rank=8, steps=4, batch_size=4, val_size=8, val_every=2,
                             max_minutes=None, stats_samples=500)  # fmt: skip
    started = time.monotonic() - 100.0  # as if loading the model had taken 100 s
    trained = train_editor(lm, read_edit_records(path), tmp_path / "editor", config,
                           started=started, progress=False)  # fmt: skip
    assert trained.folder == tmp_path / "editor"
    training = json.loads((trained.folder / "editor.json").read_text())["training"]
    assert training == json.loads(json.dumps(trained.training))
    assert training["data"] == str(path) and training["config"] == config.to_dict()
    assert training["steps"] == trained.result.steps <= 4
    assert training["train_records"] + training["val_records"] == 24
    assert training["command_seconds"] >= 100.0
    network = load_editor(trained.folder, lm)
    assert network.rank == 8

    rows = trained.rows()
    labels = [row.label for row in rows]
    assert labels[:3] == ["unedited model", "untrained", "trained (best)"]
    assert rows[0].step is None and rows[1].step == 0
    assert rows[2].step == trained.result.best["step"]
    assert rows[2].scores == {k: trained.result.best[k] for k in SCORES}
    assert len(rows) == (4 if trained.result.step_scale != 1.0 else 3)
