"""The meta-training hyperparameters of a MEND editor (and the shape of the editor they build).

Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1 and §4 (the loss weights c_edit
and c_loc); the training procedure itself is in :mod:`.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmscalpel.core.config import MethodConfig, option
from lmscalpel.mechanics.stats import DEFAULT_CORPUS, DEFAULT_SAMPLES


@dataclass
class MENDTrainConfig(MethodConfig):
    """Meta-training hyperparameters (and the shape of the editor they build).

    ``layers`` (negative counts from the top) and ``matrices`` (``"mlp"``: every MLP matrix,
    ``"mlp_out"``: the output one) choose the edited weights; ``rank`` is the width of each
    transform's hidden layer. ``lr`` trains the transforms, ``step_lr`` the log step sizes.
    ``edit_weight`` and ``loc_weight`` weigh the edit/paraphrase NLL against the locality KL
    (the paper's c_edit = 0.1 and c_loc = 1).
    ``val_size`` records are held out; ``calibration_edits`` training edits set the input
    statistics and the initial step size. ``max_train`` caps the training records used: each
    record's pass through the unedited blocks below the edit is made once and kept (see
    :class:`~lmscalpel.methods.mend.lower.LowerCache`), so later epochs over the same records
    cost a fraction of the first.
    """

    layers: list[int] = option(
        help="edited layers (negative counts from the top)",
        factory=lambda: [-3, -2, -1],
        nonempty=True,
    )
    matrices: Literal["mlp", "mlp_out"] = option(
        "mlp", "edited matrices per layer: every MLP matrix, or only the MLP output one"
    )
    rank: int = option(
        256, "width of each gradient transform's low-rank hidden layer", at_least=1, at_most=65_536
    )
    steps: int = option(2000, "at most this many meta-training steps", at_least=0, at_most=10**7)
    batch_size: int = option(
        8, "edits per meta-training step (and per validation batch)", at_least=1, at_most=100_000
    )
    lr: float = option(
        1e-4, "Adam's learning rate for the gradient transforms", above=0, at_most=10
    )
    step_lr: float = option(
        1e-2, "Adam's learning rate for the per-matrix log step sizes", at_least=0, at_most=10
    )
    edit_weight: float = option(
        0.1,
        "weight of the edit and paraphrase NLL in the meta-loss (the paper's c_edit)",
        at_least=0,
        at_most=1e6,
    )
    loc_weight: float = option(
        1.0,
        "weight of the locality KL(original ‖ edited) in the meta-loss (the paper's c_loc)",
        at_least=0,
        at_most=1e6,
    )
    grad_clip: float = option(
        1.0, "the editor's gradient norm is clipped to this per step", above=0, finite=False
    )
    val_size: int = option(96, "records held out for validation", at_least=1)
    val_every: int = option(50, "validate every this many steps", at_least=1)
    patience: int = option(6, "stop after this many validations without a better score", at_least=1)
    max_minutes: float | None = option(
        25.0, "stop after this much wall time (None: no limit)", at_least=0
    )
    calibration_edits: int = option(
        64,
        "training edits that set the (u, δ) statistics and the initial step size",
        at_least=1,
    )
    max_train: int | None = option(
        2000, "at most this many training records (None: all)", at_least=1
    )
    step_scales: tuple[float, ...] = option(
        (0.25, 0.4, 0.55, 0.7, 0.85, 1.0),
        "multiples of the learned step sizes scanned on validation after training",
        above=0,
        at_most=1e3,
        nonempty=True,
    )
    precondition: bool = option(
        True, "step along C⁻¹u, C the second moment of each matrix's inputs over text"
    )
    ridge: float = option(
        1e-3, "ridge added to C before inverting it (precondition)", above=0, at_most=1e6
    )
    stats_corpus: str = option(
        DEFAULT_CORPUS, "text corpus C is measured on (precondition)", nonempty=True, path=True
    )
    stats_samples: int = option(
        DEFAULT_SAMPLES, "tokens in C's estimate (precondition)", at_least=1, at_most=10**10
    )
    seed: int = option(
        0, "seed of the editor's initialisation and the record shuffles", at_least=0, below=2**63
    )
