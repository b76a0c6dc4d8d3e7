"""Fault injection (issue 15): an exception, a KeyboardInterrupt or a NaN raised halfway inside
each weight method's computation (rome, ft-l, ft-m, lora, mend) leaves the model bit-identical.

The faults are placed where every method computes: the forward pass of a decoder layer (which
raises, or whose output turns to NaN, on its k-th call) and the optimiser's step (which raises on
its k-th call); k runs through every call from the first to the last one a clean edit makes.
After a raised fault the same exception comes out (or a documented lmscalpel error) and the
weights hash as before, with no hook left on the model; after a NaN the edit either fails with a
documented error (a diverging optimisation, a non-finite delta) or returns a finite patch whose
revert restores the weights bit for bit — never NaN in the weights.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from lmscalpel.core.requests import EditRequest
from lmscalpel.editing import edit
from lmscalpel.methods.mend.calibration import build_network
from lmscalpel.methods.mend.checkpoint import save_editor
from lmscalpel.methods.mend.config import MENDTrainConfig
from lmscalpel.testing import tiny_model
from test_fuzz_api import DOCUMENTED, finite, tally_to_json, weight_digest

REQUEST = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                      target_new="Rome", target_true="Paris")  # fmt: skip
CONFIGS = {
    "rome": {"layer": 1, "max_steps": 6, "statistics": False, "prefixes": 0, "lr": 0.5},
    "ft-l": {"layers": [1], "steps": 6, "lr": 0.05},
    "ft-m": {"layers": [1], "steps": 6, "lr": 0.05},
    "lora": {"layers": [1], "steps": 6, "rank": 2},
    "mend": {},
}
METHODS = list(CONFIGS)
TALLY: Counter[tuple[str, str]] = Counter()


class InjectedFault(RuntimeError):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSCALPEL_HOME", str(tmp_path_factory.mktemp("faults-home")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    TALLY.clear()
    yield
    torch.set_num_threads(threads)
    mp.undo()
    tally_to_json(TALLY, "faults")


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def mend_editor(lm, tmp_path_factory):
    """An untrained MEND editor for the tiny model (its computation is what matters here)."""
    config = MENDTrainConfig(rank=8, steps=1, batch_size=2, val_size=2, val_every=1,
                             max_minutes=None)  # fmt: skip
    folder = tmp_path_factory.mktemp("mend") / "editor"
    return str(save_editor(build_network(lm, config), lm, folder))


def config_for(method: str, mend_editor: str) -> dict:
    return {"editor": mend_editor} if method == "mend" else dict(CONFIGS[method])


class Counted:
    """Count (and at call ``at`` sabotage) the forward passes of one decoder layer and the steps
    of every torch optimiser."""

    def __init__(self, lm, where: str, fault: str, at: int | None) -> None:
        self.lm, self.where, self.fault, self.at, self.calls = lm, where, fault, at, 0
        self.handles: list = []

    def _hit(self) -> bool:
        self.calls += 1
        return self.at is not None and self.calls == self.at

    def _raise(self):
        raise KeyboardInterrupt() if self.fault == "interrupt" else InjectedFault("injected")

    def __enter__(self):
        if self.where == "forward":
            layer = self.lm.model.model.layers[2]

            def hook(module, args, output):
                if not self._hit():
                    return None
                if self.fault == "nan":
                    hidden = output[0] if isinstance(output, tuple) else output
                    poisoned = hidden * float("nan")  # still on the autograd graph
                    return (poisoned, *output[1:]) if isinstance(output, tuple) else poisoned
                self._raise()

            self.handles.append(layer.register_forward_hook(hook))
        else:
            counted = self
            self._patches = []
            for cls in {type(o) for o in _optimiser_classes()}:
                self._patches.append((cls, cls.__dict__.get("step")))
                original = cls.step

                def wrapped(optimiser, *args, _original=original, **kwargs):
                    if counted._hit():
                        counted._raise()
                    return _original(optimiser, *args, **kwargs)

                cls.step = wrapped
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        for cls, original in getattr(self, "_patches", []):
            if original is None:
                del cls.step
            else:
                cls.step = original
        return False


def _optimiser_classes():
    """One instance of each optimiser class the methods use (their ``step`` is sabotaged)."""
    parameter = [torch.nn.Parameter(torch.zeros(1))]
    return [torch.optim.Adam(parameter), torch.optim.AdamW(parameter), torch.optim.SGD(parameter)]


def no_hooks_left(lm) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in lm.model.modules()
    )


def calls_of_a_clean_edit(lm, method: str, where: str, mend_editor: str) -> int:
    with Counted(lm, where, "none", None) as counted:
        patch = edit(lm, REQUEST, method=method, config=config_for(method, mend_editor))
    patch.revert()
    return counted.calls


FAULTS = [("forward", "raise"), ("forward", "interrupt"), ("forward", "nan"), ("step", "raise")]


@pytest.mark.parametrize(
    ("method", "where", "fault"),
    [(m, w, f) for m in METHODS for w, f in FAULTS if not (m == "mend" and w == "step")],
)  # MEND's edit runs no optimiser
def test_a_fault_halfway_leaves_the_model_bit_identical(lm, mend_editor, method, where, fault):
    total = calls_of_a_clean_edit(lm, method, where, mend_editor)
    assert total > 0, f"{method} makes no {where} call: the fault would never be injected"
    for at in range(1, total + 1):
        before = weight_digest(lm)
        try:
            with Counted(lm, where, fault, at):
                patch = edit(lm, REQUEST, method=method, config=config_for(method, mend_editor))
        except (InjectedFault, KeyboardInterrupt):
            assert fault in ("raise", "interrupt")
            outcome = "fault-propagated"
        except DOCUMENTED as error:
            assert str(error).strip()
            outcome = "documented-error"
        else:
            outcome = "ok"
            assert finite(patch), f"call {at}: a patch with non-finite deltas was returned"
            for name, param in lm.model.named_parameters():
                assert torch.isfinite(param).all(), f"call {at}: {name} is not finite"
            patch.revert()
        assert no_hooks_left(lm), f"call {at}: a hook was left on the model"
        assert weight_digest(lm) == before, f"call {at}: the weights changed"
        TALLY[(f"fault-{method}-{where}-{fault}", outcome)] += 1
