"""The meta-training hyperparameters of a MEND editor (and the shape of the editor they build).

Mitchell et al. 2022, "Fast Model Editing at Scale", Algorithm 1 and §4 (the loss weights c_edit
and c_loc); the training procedure itself is in :mod:`.train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmscalpel.core.config import ConfigError, MethodConfig, option
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
        help="edited layers (negative counts from the top)", factory=lambda: [-3, -2, -1]
    )
    matrices: Literal["mlp", "mlp_out"] = option(
        "mlp", "edited matrices per layer: every MLP matrix, or only the MLP output one"
    )
    rank: int = option(256, "width of each gradient transform's low-rank hidden layer")
    steps: int = option(2000, "at most this many meta-training steps")
    batch_size: int = option(8, "edits per meta-training step (and per validation batch)")
    lr: float = option(1e-4, "Adam's learning rate for the gradient transforms")
    step_lr: float = option(1e-2, "Adam's learning rate for the per-matrix log step sizes")
    edit_weight: float = option(
        0.1, "weight of the edit and paraphrase NLL in the meta-loss (the paper's c_edit)"
    )
    loc_weight: float = option(
        1.0, "weight of the locality KL(original ‖ edited) in the meta-loss (the paper's c_loc)"
    )
    grad_clip: float = option(1.0, "the editor's gradient norm is clipped to this per step")
    val_size: int = option(96, "records held out for validation")
    val_every: int = option(50, "validate every this many steps")
    patience: int = option(6, "stop after this many validations without a better score")
    max_minutes: float | None = option(25.0, "stop after this much wall time (None: no limit)")
    calibration_edits: int = option(
        64, "training edits that set the (u, δ) statistics and the initial step size"
    )
    max_train: int | None = option(2000, "at most this many training records (None: all)")
    step_scales: tuple[float, ...] = option(
        (0.25, 0.4, 0.55, 0.7, 0.85, 1.0),
        "multiples of the learned step sizes scanned on validation after training",
    )
    precondition: bool = option(
        True, "step along C⁻¹u, C the second moment of each matrix's inputs over text"
    )
    ridge: float = option(1e-3, "ridge added to C before inverting it (precondition)")
    stats_corpus: str = option(DEFAULT_CORPUS, "text corpus C is measured on (precondition)")
    stats_samples: int = option(DEFAULT_SAMPLES, "tokens in C's estimate (precondition)")
    seed: int = option(0, "seed of the editor's initialisation and the record shuffles")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers:
            raise ConfigError("MENDTrainConfig.layers is empty: name at least one layer to edit")
        for key in ("rank", "batch_size", "val_every", "patience", "calibration_edits"):
            if getattr(self, key) < 1:
                raise ConfigError(f"MENDTrainConfig.{key} must be at least 1")
        if any(scale <= 0 for scale in self.step_scales):
            raise ConfigError("MENDTrainConfig.step_scales must be positive")
        if self.steps < 0 or self.val_size < 1:
            raise ConfigError("MENDTrainConfig: steps must be >= 0 and val_size >= 1")
