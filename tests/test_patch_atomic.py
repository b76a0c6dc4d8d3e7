"""Apply and revert are all or nothing under any exception, KeyboardInterrupt included (issue 16).

Faults are injected at every step: each internal step point of apply/revert
(``lmscalpel.patch._fault_point``), each SHA-256 digest, each materialised delta, and a real SIGINT
while the parameters are switched; for dense and low-rank deltas, one and three matrices, with and
without a backup. After every fault the whole model hashes as before the call (every parameter),
the patch's state says so, and the patch still applies and reverts; an interrupted revert leaves
the patch applied and a retry completes. Non-finite deltas are refused where they are made and
again by apply.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from lmscalpel import EditRequest, Patch, PatchError
from lmscalpel import patch as patch_module
from lmscalpel.models.fingerprint import model_fingerprint, tensor_digest
from lmscalpel.patch import NonFiniteDeltaError, ParameterDelta, WeightSnapshot

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome"
)
SHAPES = [(True, 1), (False, 1), (True, 3), (False, 3)]  # (low_rank, matrices)


def hashes(lm) -> dict[str, str]:
    """The digest of every parameter of the model."""
    return {n: tensor_digest(p) for n, p in lm.model.named_parameters()}


def make_patch(lm, low_rank: bool, matrices: int, seed: int = 3) -> Patch:
    torch.manual_seed(seed)
    deltas = []
    for layer in range(matrices):
        name = lm.adapter.mlp_out_weight_name(layer)
        rows, cols = lm.model.get_parameter(name).shape
        if low_rank:
            deltas.append(
                ParameterDelta.from_low_rank(name, torch.randn(rows, 2), torch.randn(2, cols))
            )
        else:
            deltas.append(ParameterDelta.from_dense(name, torch.randn(rows, cols) * 0.1))
    return Patch.from_deltas(lm, "test", [REQUEST], deltas, {"alpha": 1})


class Fault:
    """Replace a callable with one that raises ``error`` on its ``at``-th call (0: never) and
    counts the calls."""

    def __init__(self, monkeypatch, owner, name: str, at: int = 0, error=KeyboardInterrupt):
        self.calls, self.at, self.error = 0, at, error
        real = getattr(owner, name)

        def flaky(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise self.error(f"fault at call {self.calls}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, flaky)


TARGETS = {
    "step": (patch_module, "_fault_point"),
    "digest": (patch_module, "tensor_digest"),
    "materialize": (ParameterDelta, "materialize"),
}


def count_calls(monkeypatch, target: str, work) -> int:
    with monkeypatch.context() as m:
        fault = Fault(m, *TARGETS[target])
        work()
        return fault.calls


@pytest.mark.parametrize("keep_backup", [True, False])
@pytest.mark.parametrize("low_rank,matrices", SHAPES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_apply_interrupted_at_every_step_leaves_the_model_bit_identical(
    tiny, monkeypatch, target, low_rank, matrices, keep_backup
):
    before = hashes(tiny)
    counted = make_patch(tiny, low_rank, matrices)  # a clean run, to count the steps
    snapshot = WeightSnapshot(tiny, counted.parameter_names)
    steps = count_calls(monkeypatch, target, lambda: counted.apply(tiny, keep_backup=keep_backup))
    assert steps >= matrices
    assert hashes(tiny) != before and counted.is_applied
    snapshot.restore()
    assert hashes(tiny) == before
    patch = make_patch(tiny, low_rank, matrices)
    for at in range(1, steps + 1):
        with monkeypatch.context() as m:
            Fault(m, *TARGETS[target], at=at)
            with pytest.raises(KeyboardInterrupt):
                patch.apply(tiny, keep_backup=keep_backup)
        assert hashes(tiny) == before, f"model changed by an apply interrupted at call {at}"
        assert not patch.is_applied and patch._backup is None and patch._applied_digests is None
    patch.apply(tiny)  # the patch is intact: it still applies and reverts
    patch.revert()
    assert hashes(tiny) == before


@pytest.mark.parametrize("low_rank,matrices", SHAPES)
@pytest.mark.parametrize("target", ["step", "digest"])
def test_revert_interrupted_at_every_step_stays_applied_and_a_retry_completes(
    tiny, monkeypatch, target, low_rank, matrices
):
    patch = make_patch(tiny, low_rank, matrices)
    before = hashes(tiny)
    patch.apply(tiny)
    edited = hashes(tiny)
    steps = count_calls(monkeypatch, target, patch.revert)
    assert hashes(tiny) == before
    patch.apply(tiny)
    for at in range(1, steps + 1):
        with monkeypatch.context() as m:
            Fault(m, *TARGETS[target], at=at)
            with pytest.raises(KeyboardInterrupt):
                patch.revert()
        assert hashes(tiny) == edited, f"a revert interrupted at call {at} left a mix"
        assert patch.is_applied
    patch.revert()  # the retry completes
    assert hashes(tiny) == before and not patch.is_applied


def test_the_faults_of_the_issue(tiny, monkeypatch):
    """The three faults found on the embedded model with a three-matrix patch (issue 16)."""
    before = hashes(tiny)
    patch = make_patch(tiny, low_rank=False, matrices=3)

    # apply(keep_backup=False) interrupted at the second of three deltas
    with monkeypatch.context() as m:
        Fault(m, ParameterDelta, "materialize", at=2)
        with pytest.raises(KeyboardInterrupt):
            patch.apply(tiny, keep_backup=False)
    assert hashes(tiny) == before and not patch.is_applied

    # apply() interrupted while the applied digests are taken (after the three deltas)
    with monkeypatch.context() as m:
        Fault(m, patch_module, "tensor_digest", at=3 + 2)
        with pytest.raises(KeyboardInterrupt):
            patch.apply(tiny)
    assert hashes(tiny) == before and not patch.is_applied

    # revert() interrupted at the second of three matrices, then retried
    patch.apply(tiny)
    edited = hashes(tiny)
    switches = []

    def second_switch(step):
        switches.append(step == "switch")
        if sum(switches) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(patch_module, "_fault_point", second_switch)
        with pytest.raises(KeyboardInterrupt):
            patch.revert()
    assert hashes(tiny) == edited and patch.is_applied
    patch.revert()
    assert hashes(tiny) == before


@pytest.fixture
def default_ctrl_c():
    """Ctrl-C raising KeyboardInterrupt, as in a terminal (a background job starts with SIGINT
    ignored), restored afterwards."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_an_ignored_ctrl_c_stays_ignored_during_the_switch(tiny, monkeypatch):
    """A process that ignores SIGINT (nohup, a background job) is not interrupted by one that
    arrives during the switch: the apply completes."""
    patch = make_patch(tiny, low_rank=True, matrices=3)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setattr(
            patch_module,
            "_fault_point",
            lambda step: os.kill(os.getpid(), signal.SIGINT) if step == "switch" else None,
        )
        patch.apply(tiny)
        assert patch.is_applied and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    monkeypatch.undo()
    patch.revert()


@pytest.mark.parametrize("operation", ["apply", "revert"])
def test_a_real_ctrl_c_while_the_weights_are_switched_rolls_back(
    tiny, monkeypatch, operation, default_ctrl_c
):
    """SIGINT arriving in the middle of the switch is held until the switch is rolled back."""
    patch = make_patch(tiny, low_rank=True, matrices=3)
    before = hashes(tiny)
    if operation == "revert":
        patch.apply(tiny)
    expected = hashes(tiny)
    seen = []

    def ctrl_c(step):
        seen.append(step)
        if step == "switch" and seen.count("switch") == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(patch_module, "_fault_point", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        if operation == "apply":
            patch.apply(tiny)
        else:
            patch.revert()
    assert seen.count("switch") == 3  # the switch ran whole, then was rolled back
    assert hashes(tiny) == expected and patch.is_applied == (operation == "revert")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    if operation == "revert":
        patch.revert()
    assert hashes(tiny) == before


@pytest.mark.parametrize("error", [RuntimeError, MemoryError, SystemExit, GeneratorExit])
def test_any_exception_rolls_back(tiny, monkeypatch, error):
    patch = make_patch(tiny, low_rank=False, matrices=3)
    before = hashes(tiny)
    with monkeypatch.context() as m:
        Fault(m, patch_module, "_fault_point", at=8, error=error)  # after the second switch
        with pytest.raises(error):
            patch.apply(tiny)
    assert hashes(tiny) == before and not patch.is_applied


def test_a_half_reverted_model_is_reverted_by_a_retry(tiny):
    """Tensors already back at their base digest count as reverted (e.g. after a rollback that
    itself failed); the others must still hold the applied weights."""
    patch = make_patch(tiny, low_rank=False, matrices=3)
    before = hashes(tiny)
    patch.apply(tiny)
    first = patch.parameter_names[0]
    with torch.no_grad():
        tiny.model.get_parameter(first).copy_(patch._backup[first])
    patch.revert()
    assert hashes(tiny) == before


def test_a_damaged_backup_is_found_before_the_model_changes(tiny):
    patch = make_patch(tiny, low_rank=True, matrices=3)
    patch.apply(tiny)
    edited = hashes(tiny)
    patch._backup[patch.parameter_names[1]][0, 0] += 1.0
    with pytest.raises(PatchError, match="bit-exactly"):
        patch.revert()
    assert hashes(tiny) == edited and patch.is_applied


def test_weights_changed_behind_the_patch_are_refused_and_untouched(tiny):
    patch = make_patch(tiny, low_rank=True, matrices=3).apply(tiny)
    with torch.no_grad():
        tiny.model.get_parameter(patch.parameter_names[2])[0, 0] += 1.0
    changed = hashes(tiny)
    with pytest.raises(PatchError, match="reverse order"):
        patch.revert()
    assert hashes(tiny) == changed and patch.is_applied


# ---- finite deltas ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_deltas_are_refused_where_they_are_made(tiny, bad):
    name = tiny.adapter.mlp_out_weight_name(1)
    rows, cols = tiny.model.get_parameter(name).shape
    dense = torch.zeros(rows, cols)
    dense[3, 4] = bad
    with pytest.raises(NonFiniteDeltaError, match=name.replace(".", r"\.")):
        ParameterDelta.from_dense(name, dense)
    left = torch.ones(rows, 1)
    left[0, 0] = bad
    with pytest.raises(NonFiniteDeltaError, match="left"):
        ParameterDelta.from_low_rank(name, left, torch.ones(1, cols))
    assert issubclass(NonFiniteDeltaError, PatchError)


def test_from_deltas_refuses_deltas_that_became_or_overflow_to_non_finite(tiny):
    name = tiny.adapter.mlp_out_weight_name(1)
    rows, cols = tiny.model.get_parameter(name).shape
    delta = ParameterDelta.from_dense(name, torch.zeros(rows, cols))
    delta.dense[0, 0] = float("nan")  # tensors are mutable: checked again
    with pytest.raises(NonFiniteDeltaError, match="NaN"):
        Patch.from_deltas(tiny, "test", [REQUEST], [delta])
    huge = ParameterDelta.from_low_rank(
        name, torch.full((rows, 1), 1e30), torch.full((1, cols), 1e30)
    )
    with pytest.raises(
        NonFiniteDeltaError, match="overflow"
    ):  # finite factors, product inf in fp32
        Patch.from_deltas(tiny, "test", [REQUEST], [huge])


def test_apply_checks_finiteness_again_like_a_safe_merge(tiny):
    before = hashes(tiny)
    patch = make_patch(tiny, low_rank=False, matrices=3)
    patch.deltas[2].dense[1, 1] = float("inf")  # damaged after it was made
    with pytest.raises(NonFiniteDeltaError, match=patch.parameter_names[2].replace(".", r"\.")):
        patch.apply(tiny)
    assert hashes(tiny) == before and not patch.is_applied


def test_a_sum_that_overflows_is_refused():
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.fill_(3e38)
    delta = ParameterDelta.from_dense("weight", torch.full((4, 4), 3e38))
    patch = Patch(
        "test", [REQUEST], deltas=[delta], base_digests={"weight": tensor_digest(layer.weight)}
    )
    before = tensor_digest(layer.weight)
    with pytest.raises(NonFiniteDeltaError, match="NaN or infinite weights"):
        patch.apply(layer)
    assert tensor_digest(layer.weight) == before


# ---- weight snapshots --------------------------------------------------------------------------
def test_an_interrupted_snapshot_take_records_nothing_and_restore_can_be_retried(tiny, monkeypatch):
    names = [tiny.adapter.mlp_out_weight_name(layer) for layer in range(3)]
    before = hashes(tiny)
    snapshot = WeightSnapshot(tiny)
    with monkeypatch.context() as m:
        Fault(m, patch_module, "_fault_point", at=2)
        with pytest.raises(KeyboardInterrupt):
            snapshot.take(names)
    assert snapshot.names == [] and snapshot.digests == {}
    snapshot.take(names)
    with torch.no_grad():
        for name in names:
            tiny.model.get_parameter(name).add_(1.0)
    with monkeypatch.context() as m:
        Fault(m, patch_module, "_fault_point", at=2)
        with pytest.raises(KeyboardInterrupt):
            snapshot.restore()
    snapshot.restore()  # the retry completes
    assert hashes(tiny) == before


def test_a_sequential_run_without_backups_restores_from_a_snapshot(tiny, monkeypatch):
    """The protocols' pattern: protect, apply(keep_backup=False) with faults, restore."""
    before = hashes(tiny)
    snapshot = WeightSnapshot(tiny)
    patches = [make_patch(tiny, low_rank=True, matrices=2, seed=s) for s in range(1)]
    for patch in patches:
        snapshot.take(patch.parameter_names)
        with monkeypatch.context() as m:
            Fault(m, patch_module, "_fault_point", at=5)
            with pytest.raises(KeyboardInterrupt):
                patch.apply(tiny, keep_backup=False)
        assert hashes(tiny) == before
        patch.apply(tiny, keep_backup=False)
        with pytest.raises(PatchError, match="without a backup"):
            patch.revert()
    snapshot.restore()
    assert hashes(tiny) == before


def test_tied_parameters_under_two_names_are_refused(tiny_gpt2):
    lm = tiny_gpt2
    tied = lm.model.get_parameter("lm_head.weight") is lm.model.get_parameter(
        "transformer.wte.weight"
    )
    if not tied:
        pytest.skip("the tiny gpt2 does not tie its embeddings")
    shape = lm.model.get_parameter("lm_head.weight").shape
    deltas = [
        ParameterDelta.from_dense("lm_head.weight", torch.zeros(shape)),
        ParameterDelta.from_dense("transformer.wte.weight", torch.zeros(shape)),
    ]
    patch = Patch.from_deltas(lm, "test", [REQUEST], deltas)
    with pytest.raises(PatchError, match="tied"):
        patch.apply(lm)


@pytest.mark.real
def test_the_embedded_model_with_a_three_matrix_patch_survives_every_interrupt(smol, monkeypatch):
    """The setting of issue 16: a three-matrix dense patch on SmolLM2, interrupted at every step
    of apply (with and without a backup) and of revert."""
    names = [smol.adapter.mlp_out_weight_name(layer) for layer in (3, 4, 5)]
    torch.manual_seed(0)
    deltas = [
        ParameterDelta.from_dense(n, torch.randn(smol.model.get_parameter(n).shape) * 1e-3)
        for n in names
    ]
    patch = Patch.from_deltas(smol, "ft-l", [REQUEST], deltas)

    def touched():
        return [tensor_digest(smol.model.get_parameter(n)) for n in names]

    before, fingerprint = touched(), smol.fingerprint
    steps = count_calls(monkeypatch, "step", lambda: patch.apply(smol))
    edited = touched()
    for at in range(1, count_calls(monkeypatch, "step", patch.revert) + 1):
        patch.apply(smol)
        with monkeypatch.context() as m:
            Fault(m, *TARGETS["step"], at=at)
            with pytest.raises(KeyboardInterrupt):
                patch.revert()
        assert touched() == edited and patch.is_applied
        patch.revert()
    for keep_backup in (True, False):
        for at in range(1, steps + 1):
            with monkeypatch.context() as m:
                Fault(m, *TARGETS["step"], at=at)
                with pytest.raises(KeyboardInterrupt):
                    patch.apply(smol, keep_backup=keep_backup)
            assert touched() == before and not patch.is_applied
    assert touched() == before and model_fingerprint(smol.model) == fingerprint
