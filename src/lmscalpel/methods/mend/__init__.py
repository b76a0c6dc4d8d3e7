"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022, "Fast Model
Editing at Scale").

A small network, meta-trained on edit records, maps the rank-one pieces u δᵀ of a fine-tuning
gradient to a better weight change, so that an edit costs one forward and backward pass.

- :mod:`.grads` — each token's layer input u and output gradient δ, by hooks;
- :mod:`.network` — the gradient transform (low-rank MLP, identity at init, per-matrix scale,
  shift and step size);
- :mod:`.edited` — the edited model in a forward pass, per batch row, weights untouched;
- :mod:`.train` — meta-training with early stopping (records come from any benchmark file
  :func:`lmscalpel.evaluation.read_dataset` reads);
- :mod:`.checkpoint` — safetensors + JSON, refused for another model;
- :mod:`.editor` — the registered ``mend`` editor producing ordinary patches.
"""

from lmscalpel.methods.mend.checkpoint import (
    EditorCheckpointError,
    editor_digest,
    load_editor,
    read_editor_config,
    save_editor,
)
from lmscalpel.methods.mend.editor import MEND, MENDConfig, mend_patch
from lmscalpel.methods.mend.grads import TokenGrads, edit_token_grads, edited_parameter_names
from lmscalpel.methods.mend.network import GradientTransform, MENDNetwork
from lmscalpel.methods.mend.train import MENDTrainConfig, TrainResult, train_mend

__all__ = [
    "MEND",
    "EditorCheckpointError",
    "GradientTransform",
    "MENDConfig",
    "MENDNetwork",
    "MENDTrainConfig",
    "TokenGrads",
    "TrainResult",
    "edit_token_grads",
    "edited_parameter_names",
    "editor_digest",
    "load_editor",
    "mend_patch",
    "read_editor_config",
    "save_editor",
    "train_mend",
]
