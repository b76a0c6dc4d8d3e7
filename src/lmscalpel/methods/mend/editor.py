"""The registered ``mend`` editor: one forward and backward pass, then the trained network.

Mitchell et al. 2022, "Fast Model Editing at Scale". Given a trained editor (see :mod:`.train`,
``lmscalpel train-editor --method mend``), an edit costs one forward and backward pass of the
frozen model on the edit prompts (for each token's u and δ, :mod:`.grads`) and one pass of the
small editor network. The result is an ordinary weight patch: for each edited matrix
ΔW = -η Σ_t δ̃_t ũ_tᵀ, stored as low-rank factors (rank = number of edit tokens) or densely when
that is smaller. Several requests edit together: their tokens' outer products add up, as in
MEND's batched edits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from lmscalpel.core.config import ConfigError, MethodConfig, option
from lmscalpel.core.requests import EditRequest
from lmscalpel.methods.base import Editor, register
from lmscalpel.methods.mend.checkpoint import editor_digest, load_editor, read_editor_config
from lmscalpel.methods.mend.grads import TokenGrads, edit_token_grads
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import ParameterDelta, Patch


@dataclass
class MENDConfig(MethodConfig):
    """How to edit with a trained MEND editor.

    ``editor``: folder of an editor trained for this model (``lmscalpel train-editor --method
    mend --out DIR``; on the command line ``--editor DIR``). ``step_scale`` multiplies the learned
    step sizes (above 1 edits harder, below 1 more gently); ``None`` takes the scale chosen on
    held-out edits when the editor was trained (1 for editors saved without one).
    ``direction``: ``"learned"`` uses the editor's ΔW; ``"gradient"`` replaces it, matrix by
    matrix, by the plain gradient step of the edit loss rescaled to the same Frobenius norm — the
    untrained baseline "a gradient step of the same size".
    """

    editor: str | None = option(
        None, "folder of an editor trained for this model", nonempty=True, path=True
    )
    step_scale: float | None = option(
        None,
        "multiple of the learned step sizes (None: the one chosen when training)",
        above=0,
        at_most=1e3,
    )
    direction: Literal["learned", "gradient"] = option(
        "learned", "the editor's ΔW, or the plain gradient step rescaled to its norm"
    )


def _delta(lm: LoadedModel, name: str, left: torch.Tensor, right: torch.Tensor) -> ParameterDelta:
    """A patch entry for the (out, in) update left @ right, low-rank when that is smaller."""
    dtype = lm.model.get_parameter(name).dtype
    left, right = left.to(dtype), right.to(dtype)
    rows, rank, cols = left.shape[0], left.shape[1], right.shape[1]
    if rank * (rows + cols) < rows * cols:
        return ParameterDelta.from_low_rank(
            name, *lm.adapter.low_rank_to_storage(name, left, right)
        )
    return ParameterDelta.from_dense(name, lm.adapter.to_storage(name, left @ right))


def mend_deltas(
    lm: LoadedModel,
    grads: TokenGrads,
    network: MENDNetwork,
    config: MENDConfig,
) -> list[ParameterDelta]:
    """The patch entries for all edits in ``grads`` together (their tokens' updates add up)."""
    mask = grads.mask
    with torch.no_grad():
        factors = network.factors(grads, config.step_scale)
        deltas = []
        for name, (left, right) in factors.items():
            left_all = left.transpose(1, 2)[mask].T  # (out, n tokens)
            right_all = right[mask]  # (n tokens, in)
            if config.direction == "gradient":
                g_left = -grads.grads[name][mask].T
                g_right = grads.inputs[name][mask]
                learned = (left_all @ right_all).norm()
                plain = (g_left @ g_right).norm()
                left_all = g_left * (learned / plain if plain > 0 else 0.0)
                right_all = g_right
            deltas.append(_delta(lm, name, left_all, right_all))
    return deltas


def mend_patch(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    network: MENDNetwork,
    config: MENDConfig,
    name: str = "mend",
) -> Patch:
    """Edit with an already loaded ``network`` (see :class:`MEND`); ``lm`` is not modified."""
    if config.step_scale is None:
        config = config.replace(step_scale=1.0)
    start = time.perf_counter()
    grads = edit_token_grads(lm, requests, network.parameter_names)
    deltas = mend_deltas(lm, grads, network, config)
    info = {
        "tokens": int(grads.mask.sum()),
        "step_sizes": {n: s * config.step_scale for n, s in network.step_sizes().items()},
        "seconds": round(time.perf_counter() - start, 4),
    }
    return Patch.from_deltas(lm, name, requests, deltas, config.to_dict(), info)


@register
class MEND(Editor):
    """MEND: a trained hypernetwork turns the edit loss's gradient into the weight change."""

    name: ClassVar[str] = "mend"
    config_class: ClassVar[type[MethodConfig]] = MENDConfig
    citation: ClassVar[str] = "Mitchell et al. 2022, Fast Model Editing at Scale"

    def compute(
        self, lm: LoadedModel, requests: Sequence[EditRequest], config: MENDConfig
    ) -> Patch:
        if config.editor is None:
            raise ConfigError(
                "MEND edits with a trained editor: train one with `lmscalpel train-editor "
                "--method mend --data ../shared/data/counterfact/train.json --out DIR`, then "
                "pass --editor DIR (in Python: config={'editor': 'DIR'})"
            )
        network = load_editor(Path(config.editor), lm)
        patch = mend_patch(lm, requests, network, self._resolved(config), self.name)
        patch.info["editor_sha256"] = editor_digest(config.editor)
        return patch

    def depends_on(self, config: MENDConfig) -> dict[str, Any]:
        """The trained editor's weights digest (a retrained editor in the same folder is another
        method as far as a resumed run is concerned)."""
        if config.editor is None or not (Path(config.editor) / "editor.json").is_file():
            return {}
        return {"editor_sha256": editor_digest(config.editor)}

    def config_for(self, lm: LoadedModel) -> MENDConfig:
        """The configuration with the editor's step scale filled in, so that run manifests and
        patches record the scale really used."""
        return self._resolved(super().config_for(lm))

    @staticmethod
    def _resolved(config: MENDConfig) -> MENDConfig:
        if config.step_scale is not None or config.editor is None:
            return config
        folder = Path(config.editor)
        if not (folder / "editor.json").is_file():
            return config  # load_editor reports the missing editor clearly
        trained = read_editor_config(folder).get("training", {})
        return config.replace(step_scale=float(trained.get("step_scale", 1.0)))
