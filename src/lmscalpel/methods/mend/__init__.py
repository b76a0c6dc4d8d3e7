"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022, "Fast Model
Editing at Scale").

A small network, meta-trained on edit records, maps the rank-one pieces u δᵀ of a fine-tuning
gradient to a better weight change, so that an edit costs one forward and backward pass.

- :mod:`.grads` — each token's layer input u and output gradient δ, by hooks;
- :mod:`.network` — the gradient transform (low-rank MLP, identity at init, per-matrix scale,
  shift and step size);
- :mod:`.edited` — the edited model in a forward pass, per batch row, weights untouched;
- :mod:`.train` — meta-training with early stopping (records come from any benchmark file
  :func:`lmscalpel.evaluation.read_dataset` reads), built from :mod:`.config` (its
  hyperparameters), :mod:`.batches` (one meta-batch), :mod:`.lower` (the kept lower blocks),
  :mod:`.reference` and :mod:`.losses` (the unedited and the edited pass),
  :mod:`.validation` (held-out scores, the step scale) and :mod:`.calibration` (the untrained
  editor);
- :mod:`.checkpoint` — safetensors + JSON, refused for another model;
- :mod:`.editor` — the registered ``mend`` editor producing ordinary patches.
"""

from lmscalpel.methods.mend.batches import MetaBatch
from lmscalpel.methods.mend.calibration import build_network, calibrate, untrained_editor
from lmscalpel.methods.mend.checkpoint import (
    EditorCheckpointError,
    editor_digest,
    load_editor,
    read_editor_config,
    save_editor,
)
from lmscalpel.methods.mend.config import MENDTrainConfig
from lmscalpel.methods.mend.editor import MEND, MENDConfig, mend_patch
from lmscalpel.methods.mend.grads import (
    TokenGrads,
    edit_token_grads,
    edited_parameter_names,
    lowest_layer,
)
from lmscalpel.methods.mend.losses import meta_loss
from lmscalpel.methods.mend.lower import LowerCache
from lmscalpel.methods.mend.network import GradientTransform, MENDNetwork
from lmscalpel.methods.mend.reference import Reference, reference
from lmscalpel.methods.mend.train import TrainResult, split_records, train_mend
from lmscalpel.methods.mend.validation import choose_step_scale, validate

__all__ = [
    "MEND",
    "EditorCheckpointError",
    "GradientTransform",
    "LowerCache",
    "MENDConfig",
    "MENDNetwork",
    "MENDTrainConfig",
    "MetaBatch",
    "Reference",
    "TokenGrads",
    "TrainResult",
    "build_network",
    "calibrate",
    "choose_step_scale",
    "edit_token_grads",
    "edited_parameter_names",
    "editor_digest",
    "load_editor",
    "lowest_layer",
    "mend_patch",
    "meta_loss",
    "read_editor_config",
    "reference",
    "save_editor",
    "split_records",
    "train_mend",
    "untrained_editor",
    "validate",
]
