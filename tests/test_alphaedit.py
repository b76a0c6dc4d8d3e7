"""AlphaEdit on tiny random models: the null-space projection, the projected solve, sequences."""

import pytest
import torch

from lmscalpel import edit
from lmscalpel.core.config import ConfigError
from lmscalpel.mechanics import stats as stats_module
from lmscalpel.mechanics.stats import key_statistics
from lmscalpel.methods import get_editor
from lmscalpel.methods.alphaedit import KEYS, AlphaEditConfig, null_space_update
from lmscalpel.patch import Patch, PatchError
from lmscalpel.testing import tiny_model
from test_memit import REQUESTS, STRONG

CONFIG = {**STRONG, "layers": [1, 2], "null_energy": 0.1, "ridge": 0.01}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSCALPEL_HOME", str(tmp_path / "home"))


def state(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def matrix(lm, delta):
    """A patch delta as the (out, in) matrix the adapter presents."""
    return lm.adapter.to_storage(delta.name, delta.materialize(torch.float64))


def test_the_projected_solve():
    torch.manual_seed(0)
    d = 8
    basis = torch.linalg.qr(torch.randn(d, d).double())[0]
    null = basis[:, :5]  # a 5-dimensional "null space"
    projection = null @ null.T
    keys, residuals = torch.randn(3, d), torch.randn(3, 4)
    left, right = null_space_update(keys, residuals, null, None, 1e-3)
    delta = left @ right
    assert left.dtype == torch.float64 and right.shape == (3, d)
    preserved = basis[:, 5:] @ torch.randn(3).double()  # P k = 0
    assert (delta @ preserved).norm() < 1e-12 * preserved.norm() * delta.norm()
    # inside the null space the new keys are fitted (the ridge is small)
    fitted = delta @ keys.double().T
    assert torch.allclose(fitted, residuals.double().T, atol=0.05)
    # earlier keys K_p are (nearly) left alone; without them they would move
    earlier = torch.randn(2, d).double()
    left, right = null_space_update(keys, residuals, null, earlier.T @ earlier, 1e-3)
    assert (left @ right @ earlier.T).norm() < 1e-2 * (delta @ earlier.T).norm()
    # it is the paper's d_k × d_k form Rᵀ K P (M P + α I)⁻¹, M = KₚᵀKₚ + KᵀK
    k, m = keys.double(), earlier.T @ earlier + keys.double().T @ keys.double()
    paper = (
        residuals.double().T
        @ k
        @ projection
        @ torch.linalg.inv(m @ projection + 1e-3 * torch.eye(d).double())
    )
    assert torch.allclose(left @ right, paper, atol=1e-8)
    # P = I and no earlier keys: ridge regression Rᵀ K (KᵀK + αI)⁻¹
    left, right = null_space_update(keys, residuals, torch.eye(d).double(), None, 0.5)
    ridge = residuals.double().T @ k @ torch.linalg.inv(k.T @ k + 0.5 * torch.eye(d).double())
    assert torch.allclose(left @ right, ridge, atol=1e-10)


def test_the_projection_is_cached_beside_the_statistics(tiny, monkeypatch):
    stats = key_statistics(tiny, 1, samples=800, progress=False)
    projection = stats.null_space_projection(0.1)
    assert torch.allclose(projection, projection.T, atol=1e-12)
    assert torch.allclose(projection @ projection, projection, atol=1e-10)
    values = torch.linalg.eigvalsh(stats.moment.double()).clamp(min=0)
    expected = int(((values.cumsum(0) / values.sum()) <= 0.1).sum())
    assert round(float(projection.trace())) == expected and 0 < expected < len(values)
    # the statistics' own keys have at most 10 % of their energy in the null space
    inside = float((projection * stats.moment.double()).sum())  # tr(PC)
    assert inside <= 0.1 * float(values.sum()) + 1e-9
    assert stats.null_space_energy(0.1) == pytest.approx(inside, rel=1e-6)
    spectrum_file = stats.path.with_name(
        stats.path.name.replace(".safetensors", ".spectrum.safetensors")
    )
    assert spectrum_file.is_file()

    stats_module.SPECTRA.forget()
    stats_module.STATISTICS.forget()
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a: pytest.fail("recomputed"))
    fresh = key_statistics(tiny, 1, samples=800, progress=False)
    assert torch.equal(fresh.null_space_projection(0.1), projection)  # read from disk
    with pytest.raises(ConfigError, match="null space"):
        fresh.null_space_projection(1.0)


def test_a_stale_spectrum_is_recomputed(tiny):
    stats = key_statistics(tiny, 1, samples=800, progress=False)
    stats.spectrum()
    stats_module.SPECTRA.forget()
    changed = stats_module.KeyStatistics(
        2 * stats.moment, stats.count, stats.layer, stats.corpus, stats.path, stats.weight
    )
    spectrum = changed.spectrum()  # same file name, another moment: not the stored one
    assert torch.allclose(spectrum.eigenvalues, 2 * stats.spectrum().eigenvalues, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_keys_of_the_preserved_space_are_unchanged(model_type):
    lm = tiny_model(model_type)
    saved = state(lm)
    patch = edit(lm, REQUESTS, method="alphaedit", config=CONFIG, apply=False)
    assert all(torch.equal(p, saved[n]) for n, p in lm.model.named_parameters())
    torch.manual_seed(0)
    for layer, delta in zip([1, 2], patch.deltas):
        stats = key_statistics(lm, layer, samples=STRONG["stats_samples"], progress=False)
        projection = stats.null_space_projection(CONFIG["null_energy"])
        change = matrix(lm, delta)
        outside = torch.randn(projection.shape[0], 5).double()
        outside = outside - projection @ outside  # P k = 0: the preserved keys' space
        ratio = (change @ outside).norm() / (change.norm() * outside.norm())
        assert ratio < 1e-6, float(ratio)  # zero up to the float32 storage of the factors
        new_keys = patch.extras[KEYS.format(layer)].double()
        assert (change @ new_keys.T).norm() > 1e3 * ratio * change.norm() * new_keys.norm()
    assert patch.info["alphaedit"]["null_dimensions"]["1"] > 0


def test_in_sequence_earlier_edits_keys_are_left_alone(tiny):
    editor = get_editor("alphaedit", CONFIG)
    config = editor.config_for(tiny)
    first = editor.compute(tiny, REQUESTS[:2], config)
    first.apply(tiny)
    second = editor.compute_in_sequence(tiny, REQUESTS[2:], config, [first])
    fresh = get_editor("alphaedit", CONFIG).compute(tiny, REQUESTS[2:], config)
    assert second.info["alphaedit"]["earlier_keys"] == 2
    assert fresh.info["alphaedit"]["earlier_keys"] == 0
    for layer, kept, ignored in zip([1, 2], second.deltas, fresh.deltas):
        old = first.extras[KEYS.format(layer)].double().T
        new = second.extras[KEYS.format(layer)].double().T
        moved = (matrix(tiny, kept) @ old).norm()
        assert moved < 0.03 * (matrix(tiny, kept) @ new).norm()
        assert moved < 0.05 * (matrix(tiny, ignored) @ old).norm()
    first.revert()


def test_a_saved_sequence_continues_reapplies_and_reverts_in_order(tiny, tmp_path):
    pristine = state(tiny)
    editor = get_editor("alphaedit", CONFIG)
    config = editor.config_for(tiny)
    patches = []
    for group in (REQUESTS[:1], REQUESTS[1:3]):
        patch = editor.compute_in_sequence(tiny, group, config, patches)
        patch.apply(tiny, keep_backup=False)
        patches.append(patch)
    edited = state(tiny)
    third = editor.compute_in_sequence(tiny, REQUESTS[3:], config, patches)

    folders = [p.save(tmp_path / f"patch-{i}") for i, p in enumerate(patches)]
    loaded = [Patch.load(f) for f in folders]
    assert loaded[1].info["alphaedit"]["earlier_keys"] == 1
    for mine, theirs in zip(patches, loaded):
        assert set(theirs.extras) == {KEYS.format(1), KEYS.format(2)}
        assert all(torch.equal(mine.extras[n], theirs.extras[n]) for n in mine.extras)
    # a new process continues the sequence from the saved patches alone
    again = get_editor("alphaedit", CONFIG).compute_in_sequence(tiny, REQUESTS[3:], config, loaded)
    for mine, theirs in zip(third.deltas, again.deltas):
        assert torch.equal(mine.left, theirs.left) and torch.equal(mine.right, theirs.right)

    with torch.no_grad():  # back to the pristine model; re-apply the saved sequence in order
        for name, value in pristine.items():
            tiny.model.get_parameter(name).copy_(value)
    for patch in loaded:
        patch.apply(tiny)
    assert all(torch.equal(p, edited[n]) for n, p in tiny.model.named_parameters())
    for patch in reversed(loaded):
        patch.revert()
    assert all(torch.equal(p, pristine[n]) for n, p in tiny.model.named_parameters())


def test_the_running_sum_follows_the_sequence_it_is_given(tiny):
    editor = get_editor("alphaedit", CONFIG)
    config = editor.config_for(tiny)
    first = editor.compute(tiny, REQUESTS[:1], config)
    second = editor.compute_in_sequence(tiny, REQUESTS[1:2], config, [first])
    assert len(editor._chain) == 1
    editor.compute_in_sequence(tiny, REQUESTS[2:3], config, [first, second])
    assert len(editor._chain) == 2  # extended, not rebuilt
    other = editor.compute_in_sequence(tiny, REQUESTS[2:3], config, [second])  # another sequence
    alone = get_editor("alphaedit", CONFIG).compute_in_sequence(
        tiny, REQUESTS[2:3], config, [second]
    )
    assert len(editor._chain) == 1
    assert all(torch.equal(a.left, b.left) for a, b in zip(other.deltas, alone.deltas))


def test_earlier_patches_must_be_alphaedits_with_intact_keys(tiny):
    editor = get_editor("alphaedit", CONFIG)
    config = editor.config_for(tiny)
    first = editor.compute(tiny, REQUESTS[:1], config)
    first.extras[KEYS.format(1)] = first.extras[KEYS.format(1)] + 1.0
    with pytest.raises(PatchError, match="do not match their digest"):
        editor.compute_in_sequence(tiny, REQUESTS[1:2], config, [first])
    memit_patch = edit(tiny, REQUESTS[:1], method="memit", config=CONFIG_FOR_MEMIT, apply=False)
    with pytest.raises(PatchError, match="made by memit"):
        editor.compute_in_sequence(tiny, REQUESTS[1:2], config, [memit_patch])
    other_layers = get_editor("alphaedit", {**CONFIG, "layers": [0, 1]})
    with pytest.raises(PatchError, match="no keys for layers"):
        other_layers.compute_in_sequence(
            tiny,
            REQUESTS[1:2],
            other_layers.config_for(tiny),
            [editor.compute(tiny, REQUESTS[:1], config)],
        )


CONFIG_FOR_MEMIT = {k: v for k, v in CONFIG.items() if k not in ("null_energy", "ridge")}


def test_configuration():
    with pytest.raises(ConfigError, match="statistics"):
        AlphaEditConfig(statistics=False)
    with pytest.raises(ConfigError, match="null_energy"):
        AlphaEditConfig(null_energy=1.0)
    with pytest.raises(ConfigError, match="ridge"):
        AlphaEditConfig(ridge=0.0)
    editor = get_editor("alphaedit")
    assert "Fang" in editor.citation and editor.name == "alphaedit"
    assert hasattr(editor, "compute_in_sequence") and not hasattr(
        get_editor("memit"), "compute_in_sequence"
    )


def test_the_sequential_protocol_carries_the_earlier_keys(tmp_path, monkeypatch):
    """The evaluator's sequential protocol in groups of two: AlphaEdit gets its earlier patches,
    MEMIT and AlphaEdit run on one model, which is pristine afterwards."""
    from lmscalpel.evaluation import EvalOptions, compare
    from test_evaluation_protocols import FAST, make_cases

    lm = tiny_model("llama")
    pristine = state(lm)
    seen = []
    real = get_editor("alphaedit").__class__.compute_in_sequence

    def spy(self, lm, requests, config, earlier):
        seen.append(sum(len(p.requests) for p in earlier))
        return real(self, lm, requests, config, earlier)

    monkeypatch.setattr(get_editor("alphaedit").__class__, "compute_in_sequence", spy)
    options = EvalOptions(**{**FAST.to_dict(), "protocol": "sequential", "batch_size": 2})
    methods = {"alphaedit": CONFIG, "memit": CONFIG_FOR_MEMIT}
    summary = compare(lm, make_cases(4), methods, options=options, out=tmp_path, progress=False)
    assert seen == [0, 2]
    assert set(summary.methods) == {"alphaedit", "memit"}
    assert summary.retention["alphaedit"][-1]["edits"] == 4  # measured over all four at the end
    assert summary.rows["alphaedit"]["n_cases"] == 4
    assert all(torch.equal(p, pristine[n]) for n, p in lm.model.named_parameters())
