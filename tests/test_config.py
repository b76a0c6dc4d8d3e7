import pytest

from lmscalpel import ConfigError, get_editor
from lmscalpel.mechanics.keys_values import ValueOptions
from lmscalpel.methods import available_methods, editor_class
from lmscalpel.methods.base import new_default, resolve_layers
from lmscalpel.methods.ft import FitOptions, FTConfig, FTLConfig, FTMConfig, TunedWeights
from lmscalpel.methods.lora import LoRAConfig
from lmscalpel.methods.rome import ROMEConfig


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


# ---- help lines and composition ----------------------------------------------------------------
@pytest.mark.parametrize("method", available_methods())
def test_every_config_field_of_every_method_has_a_help_line(method):
    config_class = editor_class(method).config_class
    missing = [f.name for f in config_class.describe() if not f.help.strip()]
    assert not missing, f"{config_class.__name__} fields without help: {missing}"


def test_describe_gives_each_fields_type_help_and_the_familys_default():
    generic = {f.name: f for f in ROMEConfig.describe()}
    llama = {f.name: f for f in ROMEConfig.describe("llama")}
    assert generic["default_depth"].default == 0.2
    assert llama["default_depth"].default == 0.276  # ROME's family default for llama
    assert generic["stop_nll"].default == llama["stop_nll"].default == ValueOptions().stop_nll
    assert generic["layer"].type == "int | None" and generic["prefixes"].type == "int"
    assert "key statistics" in generic["statistics"].help
    assert [f.name for f in ROMEConfig.describe()] == ROMEConfig.field_names()


def test_describe_of_a_family_without_overrides_is_the_generic_defaults():
    assert ROMEConfig.describe("no-such-family") == ROMEConfig.describe()


def test_a_changed_default_keeps_the_help_written_once():
    ft_fields = {f.name: f for f in FTConfig.describe()}
    for config_class in (FTLConfig, FTMConfig, LoRAConfig):
        described = {f.name: f for f in config_class.describe()}
        for name in ("lr", "objective", "layers", "default_depths", "matrices"):
            assert described[name].help == ft_fields[name].help
    assert {f.name: f.default for f in FTMConfig.describe()}["objective"] == "target"
    assert {f.name: f.default for f in LoRAConfig.describe()}["lr"] == 2e-3
    with pytest.raises(TypeError, match="no field 'nope'"):
        new_default(FTConfig, "nope", 1)


def test_ft_and_lora_configs_share_the_tuned_weights_and_fit_options():
    for config_class in (FTConfig, LoRAConfig):
        assert issubclass(config_class, TunedWeights) and issubclass(config_class, FitOptions)
    shared = set(TunedWeights.field_names()) | set(FitOptions.field_names())
    assert shared <= set(FTConfig.field_names()) & set(LoRAConfig.field_names())
    assert set(FTConfig.field_names()) - shared == {"norm_constraint"}
    assert set(LoRAConfig.field_names()) - shared == {"rank", "alpha", "seed"}
