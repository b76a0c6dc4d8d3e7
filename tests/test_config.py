import pytest

from lmscalpel import ConfigError, get_editor
from lmscalpel.methods.base import resolve_layers
from lmscalpel.methods.ft import FTLConfig


def test_defaults_and_family_overrides(monkeypatch):
    monkeypatch.setattr(FTLConfig, "family_defaults", {"llama": {"lr": 0.5}})
    assert FTLConfig().lr == 1e-3
    assert FTLConfig.for_model("llama").lr == 0.5
    assert FTLConfig.for_model("gpt2").lr == 1e-3
    assert FTLConfig.for_model("llama", lr=2).lr == 2.0  # int coerced to float


def test_yaml_flat_and_sectioned(tmp_path, monkeypatch):
    flat = tmp_path / "flat.yaml"
    flat.write_text("lr: 0.01\nlayers: [3]\n")
    config = FTLConfig.from_yaml(flat)
    assert config.lr == 0.01 and config.layers == [3]
    sectioned = tmp_path / "sections.yaml"
    sectioned.write_text("defaults: {steps: 5}\nfamilies:\n  gpt2: {steps: 9}\n")
    assert FTLConfig.from_yaml(sectioned, "llama").steps == 5
    assert FTLConfig.from_yaml(sectioned, "gpt2").steps == 9


def test_unknown_keys_and_bad_types_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown FTLConfig key.*'lrr'"):
        FTLConfig.for_model(None, lrr=1)
    with pytest.raises(ConfigError, match="steps must be int"):
        FTLConfig(steps="many")
    with pytest.raises(ConfigError, match="objective must be one of"):
        FTLConfig(objective="vibes")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        FTLConfig.from_yaml(bad)


def test_editor_accepts_dict_yaml_or_instance(tmp_path, tiny):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\n")
    assert get_editor("ft-l", {"steps": 4}).config_for(tiny).steps == 4
    assert get_editor("ft-l", path).config_for(tiny).steps == 3
    assert get_editor("ft-l", FTLConfig(steps=2)).config_for(tiny).steps == 2
    with pytest.raises(ValueError, match="unknown editing method 'nope'"):
        get_editor("nope")


def test_resolve_layers():
    assert resolve_layers(None, [0.5], 30) == [14]
    assert resolve_layers(None, [0.0, 1.0], 4) == [0, 3]
    assert resolve_layers([-1], [0.5], 4) == [3]
    with pytest.raises(ConfigError, match="out of range"):
        resolve_layers([4], [0.5], 4)
