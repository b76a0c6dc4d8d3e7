"""Which layer ROME edits and why (lmscalpel.mechanics.peaks): config, recorded, shipped, depth."""

import json

import pytest

from lmscalpel.mechanics import peaks
from lmscalpel.mechanics.peaks import MEASURED, MIN_FACTS, choose_edit_layer, record_peak
from lmscalpel.methods.rome import ROMEConfig

SHIPPED = "fe072e9ea3f8cab6"  # the embedded SmolLM2-135M, whose peak ships with lmscalpel


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def summary(fingerprint: str, layer: int, facts: int = MIN_FACTS) -> dict:
    return {"mlp_peak_layer": layer, "facts_traced": facts, "window": 3, "model": "m",
            "fingerprint": fingerprint}  # fmt: skip


def choose(fingerprint, configured=None, num_layers=30):
    return choose_edit_layer(
        num_layers, fingerprint, configured=configured, depth_layer=8, default_depth=0.276
    )


def test_the_order_is_config_then_recorded_then_shipped_then_depth():
    assert MEASURED[SHIPPED].layer == 4
    assert (choose("never-traced").layer, choose("never-traced").reason) == (8, "depth")
    assert choose(None).reason == "depth"
    shipped = choose(SHIPPED)
    assert (shipped.layer, shipped.reason, shipped.peak) == (4, "shipped", MEASURED[SHIPPED])
    assert record_peak(summary(SHIPPED, 6)).layer == 6
    recorded = choose(SHIPPED)
    assert (recorded.layer, recorded.reason, recorded.peak.facts) == (6, "recorded", MIN_FACTS)
    assert choose(SHIPPED, configured=2).reason == "config"
    assert choose(SHIPPED, configured=2).layer == 2
    assert choose(SHIPPED, num_layers=5).reason == "depth"  # a peak the model cannot hold


def test_a_recording_says_when_and_on_how_many_facts_and_keeps_other_models(home):
    assert record_peak(summary("a", 1, MIN_FACTS - 1)) is None  # too few facts
    no_mlp = {k: v for k, v in summary("a", 1).items() if k != "mlp_peak_layer"}
    assert record_peak(no_mlp) is None  # the MLP was not traced
    assert not peaks.peaks_file().exists()
    first = record_peak(summary("b", 2, 40), source="here")
    record_peak(summary("c", 3))
    table = json.loads((home / "tracing" / "peaks.json").read_text())
    assert table["b"]["layer"] == 2 and table["c"]["layer"] == 3
    assert first.recorded.endswith("+00:00") and first.source == "here"
    line = choose("b").explain()
    assert "your causal-tracing aggregate (40 known facts, window 3)" in line
    assert first.recorded in line and str(peaks.peaks_file()) in line
    assert "shipped with lmscalpel (100 known facts" in choose(SHIPPED).explain()
    assert "default depth (0.276 of the layers)" in choose("never").explain()


def test_an_old_or_broken_peaks_file_is_read_or_ignored(home):
    path = peaks.peaks_file()
    path.parent.mkdir(parents=True)
    old = {"layer": 2, "facts": 30, "window": 3, "model": "m", "source": "lmscalpel trace --known"}
    path.write_text(json.dumps({"x": old}))  # written before recordings said when
    assert choose("x").layer == 2 and choose("x").peak.recorded == ""
    path.write_text("{not json")
    assert choose("x").reason == "depth"


def test_rome_config_routes_through_the_choice():
    config = ROMEConfig(default_depth=0.5)
    assert config.layer_choice(5, "never").layer == 2 == config.edit_layer(5, "never")
    assert ROMEConfig(layer=-1).layer_choice(5, SHIPPED).layer == 4  # negative: from the top
    assert ROMEConfig(layer=-1).layer_choice(5, SHIPPED).reason == "config"
    assert config.layer_choice(30, SHIPPED).layer == 4 == config.edit_layer(30, SHIPPED)
