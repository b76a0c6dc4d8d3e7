"""Method configs from YAML plus key=value overrides (lmscalpel.methods.config_files)."""

import pytest

from lmscalpel.core.config import ConfigError
from lmscalpel.methods.config_files import (
    build_config,
    method_configs,
    parse_overrides,
    route_overrides,
)
from lmscalpel.methods.ft import FTConfig
from lmscalpel.methods.rome import ROMEConfig


def configs(*args, **kwargs) -> dict:
    return dict(method_configs(*args, **kwargs))


def test_overrides_are_read_as_yaml_values():
    assert parse_overrides(["lr=0.02", "layers=[4, 5]", "name=a=b", "flag=true", "lr=0.5"]) == {
        "lr": 0.5,
        "layers": [4, 5],
        "name": "a=b",
        "flag": True,
    }
    assert parse_overrides(None) == {}
    for bad in ("lr", "=1", "x=[1"):
        with pytest.raises(ConfigError):
            parse_overrides([bad])


def test_several_methods_take_their_sections_then_routed_overrides(tmp_path):
    path = tmp_path / "methods.yaml"
    path.write_text("ft-l: {steps: 4, lr: 0.05}\nft-m: {steps: 5}\n")
    got = configs(["ft-l", "ft-m"], "llama", path, {"ft-m.steps": 3, "lr": 0.02})
    assert list(got) == ["ft-l", "ft-m"]
    assert (got["ft-l"].steps, got["ft-m"].steps) == (4, 3)  # section, then method.key
    assert got["ft-l"].lr == got["ft-m"].lr == 0.02  # a plain key: every method that has it
    routed = route_overrides(["ft-l", "rome"], {"rome.lr": 0.3, "kl_factor": 0.1, "lr": 0.2})
    assert routed == {"ft-l": {"lr": 0.2}, "rome": {"kl_factor": 0.1, "lr": 0.3}}  # specific wins


def test_one_method_reads_a_flat_file_or_its_own_section(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("layer: 2\nprefixes: 1\n")
    section = tmp_path / "section.yaml"
    section.write_text("rome:\n  layer: 2\n  prefixes: 1\n")
    for path in (flat, section):
        config = configs(["rome"], "llama", path)["rome"]
        assert isinstance(config, ROMEConfig) and (config.layer, config.prefixes) == (2, 1)
        assert config.default_depth == ROMEConfig.for_model("llama").default_depth
    assert configs(["rome"], None)["rome"] == ROMEConfig()


def test_mistakes_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="no method among .* 'lrr'"):
        method_configs(["ft-l"], None, overrides={"lrr": 1})
    with pytest.raises(ConfigError, match="unknown editing method"):
        method_configs(["ft-l", "nope"], None)
    with pytest.raises(ConfigError, match="no editing method"):
        method_configs([], None)
    with pytest.raises(ConfigError, match="learned editors"):
        method_configs(["ft-l"], None, editor="runs/editor")
    with pytest.raises(FileNotFoundError, match="no config file"):
        method_configs(["ft-l"], None, tmp_path / "missing.yaml")
    other = tmp_path / "other.yaml"
    other.write_text("rome: {layer: 2}\n")
    with pytest.raises(ConfigError, match="one section per method"):
        method_configs(["ft-l", "ft-m"], None, other)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        method_configs(["ft-l"], None, broken)


def test_the_editor_goes_to_the_learned_methods_only():
    got = configs(["ft-l", "mend"], "llama", editor="runs/editor")
    assert got["mend"].editor == "runs/editor"
    assert "editor" not in got["ft-l"].to_dict()


def test_build_config_is_family_defaults_or_file_then_overrides(tmp_path):
    assert build_config(ROMEConfig, "llama") == ROMEConfig.for_model("llama")
    path = tmp_path / "ft.yaml"
    path.write_text("defaults: {lr: 0.1}\nfamilies: {llama: {steps: 7}}\n")
    config = build_config(FTConfig, "llama", path, {"steps": 9})
    assert (config.lr, config.steps) == (0.1, 9)
    assert build_config(FTConfig, "gpt2", path).steps == FTConfig.for_model("gpt2").steps
    with pytest.raises(ConfigError):
        build_config(FTConfig, "llama", None, {"nonsense": 1})
