"""The demo: one real edit on the embedded model, shown before and after, then reverted."""

from __future__ import annotations

import time

from rich.console import Console

from lmscalpel.core.requests import EditRequest, LocalityProbe
from lmscalpel.editing import edit
from lmscalpel.methods import available_methods, get_editor
from lmscalpel.models import load_model
from lmscalpel.report import before_after_table, probe, probes_for

DEMO_REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    target_true="Paris",
    paraphrases=("The Eiffel Tower can be found in the city of",),
    locality=(LocalityProbe("The Louvre is located in the city of", "Paris"),),
)

PREFERRED_METHODS = ("rome", "ft-l")


def default_demo_method() -> str:
    """The best method available: ROME once it exists, else FT-L."""
    return next(m for m in PREFERRED_METHODS if m in available_methods())


def run_demo(console: Console, model: str | None = None, method: str | None = None) -> None:
    """Load ``model`` (default: the embedded one), edit :data:`DEMO_REQUEST` with ``method``
    (default: :func:`default_demo_method`), print the answers before and after, then revert the
    patch (which verifies the restored weights) and print the answer again."""
    method = method or default_demo_method()
    start = time.perf_counter()
    with console.status("loading the model (the first run converts it; about a minute)..."):
        lm = load_model(model)
    console.print(f"loaded {lm.name} in {time.perf_counter() - start:.1f} s: {lm}")
    probes = probes_for(DEMO_REQUEST)
    before = probe(lm, probes)
    editor = get_editor(method)
    start = time.perf_counter()
    editor.prepare(lm, editor.config_for(lm))  # statistics etc.: once per model, then cached
    if time.perf_counter() - start > 1:
        console.print(
            f"prepared {method} for this model in {time.perf_counter() - start:.0f} s "
            "(cached: later runs skip this)"
        )
    start = time.perf_counter()
    with console.status(f"editing with {method}..."):
        patch = edit(lm, DEMO_REQUEST, method=method)
    seconds = time.perf_counter() - start
    after = probe(lm, probes)
    console.print(
        before_after_table(before, after, title=f"{method}: Eiffel Tower → Rome ({seconds:.1f} s)")
    )
    console.print(patch)
    patch.revert()  # checks its own work: PatchError unless every digest matches again
    restored = "prompts restored" if patch.kind == "context" else "weights restored bit-exactly"
    reverted = probe(lm, probes[:1])[0]
    console.print(
        f"reverted: {restored} (checked against the patch's digests); "
        f"the model says again: {DEMO_REQUEST.prompt} [bold]{reverted.answer}[/bold]"
    )
