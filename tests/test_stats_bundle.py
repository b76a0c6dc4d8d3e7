"""Statistics bundles: exported once, imported into another cache, refused when they do not fit."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmscalpel.core.cache import forget_all
from lmscalpel.mechanics import stats
from lmscalpel.mechanics.stats_bundle import BundleError, export_statistics, import_statistics
from lmscalpel.testing import tiny_model


@pytest.fixture
def lm():
    return tiny_model("llama")


def weights_of(lm):
    return [lm.adapter.mlp_out_weight_name(1), lm.adapter.mlp_out_weight_name(2)]


def use_home(monkeypatch, folder):
    monkeypatch.setenv("LMSCALPEL_HOME", str(folder))
    forget_all()


def rewrite(path, out, tensors=None, **metadata):
    with safe_open(str(path), framework="pt") as handle:
        meta = {**handle.metadata(), **metadata}
        stored = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file({**stored, **(tensors or {})}, str(out), metadata=meta)
    return out


def test_an_imported_bundle_is_what_the_next_edit_reads_without_computing(
    lm, tmp_path, monkeypatch
):
    use_home(monkeypatch, tmp_path / "alice")
    bundle = export_statistics(lm, weights_of(lm), tmp_path / "c.safetensors", "model", 200,
                               progress=False)  # fmt: skip
    exported = stats.input_statistics(lm, weights_of(lm), "model", 200, progress=False)

    use_home(monkeypatch, tmp_path / "bob")
    entries = import_statistics(lm, bundle)
    assert [e.weight for e in entries] == weights_of(lm)
    forget_all()
    computed, loaded = stats.STATISTICS.computed, stats.STATISTICS.loaded
    again = stats.input_statistics(lm, weights_of(lm), "model", 200, progress=False)
    assert stats.STATISTICS.computed == computed  # read from the imported cache files
    assert stats.STATISTICS.loaded == loaded + 2
    for weight in weights_of(lm):
        assert torch.equal(again[weight].moment, exported[weight].moment)
        assert again[weight].count == exported[weight].count
        assert str(again[weight].path).startswith(str(tmp_path / "bob"))


def test_a_bundle_for_another_model_or_with_a_bad_digest_is_refused(lm, tmp_path, monkeypatch):
    use_home(monkeypatch, tmp_path / "alice")
    bundle = export_statistics(lm, weights_of(lm)[:1], tmp_path / "c.safetensors", "model", 100,
                               progress=False)  # fmt: skip
    use_home(monkeypatch, tmp_path / "bob")
    with pytest.raises(BundleError, match="not of this model"):
        import_statistics(tiny_model("llama", seed=3), bundle)

    weight = weights_of(lm)[0]
    with safe_open(str(bundle), framework="pt") as handle:
        moment = handle.get_tensor(weight)
    scaled = rewrite(bundle, tmp_path / "scaled.safetensors", {weight: moment * 2})
    with pytest.raises(BundleError, match="do not match their digest"):
        import_statistics(lm, scaled)
    entries = {weight: {"layer": 1, "count": 5, "sha256": "0" * 64}}
    relabelled = rewrite(bundle, tmp_path / "r.safetensors", weights=json.dumps(entries))
    with pytest.raises(BundleError, match="digest"):
        import_statistics(lm, relabelled)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(BundleError, match="not a safetensors statistics bundle"):
        import_statistics(lm, tmp_path / "junk.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(BundleError, match="not a statistics bundle"):
        import_statistics(lm, plain)
    assert not (tmp_path / "bob" / "stats").exists()  # nothing refused reached the cache


def test_stats_export_and_import_commands(model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lmscalpel.cli import app

    runner = CliRunner()
    use_home(monkeypatch, tmp_path / "alice")
    bundle = tmp_path / "bundle.safetensors"
    args = ["stats", "export", str(bundle), "--model", model_dir, "--layers", "1,2"]
    result = runner.invoke(app, [*args, "--samples", "80"])
    assert result.exit_code == 0, result.output
    use_home(monkeypatch, tmp_path / "bob")
    result = runner.invoke(app, ["stats", "import", str(bundle), "--model", model_dir])
    assert result.exit_code == 0, result.output
    assert "layer 1" in result.output and "layer 2" in result.output
    assert len(list((tmp_path / "bob" / "stats").rglob("*.safetensors"))) == 2
    result = runner.invoke(app, ["stats", "import", str(tmp_path / "none"), "--model", model_dir])
    assert result.exit_code == 2 and "no statistics bundle" in result.output
    result = runner.invoke(app, [*args[:3], "--model", model_dir, "--layers", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output
