"""Saving and loading trained MEND editors.

A checkpoint is a folder with ``editor.safetensors`` (the network's tensors, never pickle) and
``editor.json``: the format, the edited matrices and their shapes, the hidden rank, and the base
model's name and fingerprint, plus a record of the training (data, steps, time, validation). An
editor only makes sense for the weights it was trained on, so loading it for a model with another
fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmscalpel.core.clock import utc_now
from lmscalpel.core.config import ConfigError
from lmscalpel.core.files import atomic_folder, recover_folder, replaceable
from lmscalpel.core.version import __version__
from lmscalpel.methods.mend.network import MENDNetwork
from lmscalpel.models.loaded import LoadedModel

FORMAT = "lmscalpel-editor"
FORMAT_VERSION = 1
CONFIG_FILE = "editor.json"
TENSOR_FILE = "editor.safetensors"


class EditorCheckpointError(ConfigError):
    """A saved editor is missing, malformed, or made for another model."""


def save_editor(
    network: MENDNetwork,
    lm: LoadedModel,
    folder: str | os.PathLike,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``network`` (trained for ``lm``) to ``folder``, atomically: a crash at any moment
    leaves ``folder`` holding the old editor or the new one, whole (:func:`atomic_folder`).

    An existing folder is replaced only if it holds a saved editor (or nothing): saving over
    another folder by mistake is refused rather than deleting it."""
    folder = Path(folder)
    if not replaceable(folder, CONFIG_FILE):
        raise EditorCheckpointError(
            f"{folder} exists and is not a saved editor; choose another folder or delete it"
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": "mend",
        "lmscalpel_version": __version__,
        "created": utc_now(),
        "model_name": lm.name,
        "model_type": lm.model_type,
        "model_fingerprint": lm.fingerprint,
        "rank": network.rank,
        "precondition": network.precondition,
        "parameters": {name: list(shape) for name, shape in network.shapes.items()},
        "training": training or {},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return folder


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def editor_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of a saved editor's weights: which trained editor made an edit, whatever its
    folder is called now. Remembered per file (path, inode, size, modification time), so that
    edit after edit does not hash the same tens of megabytes again."""
    path = Path(folder) / TENSOR_FILE
    info = path.stat()
    key = (str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def read_editor_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``editor.json`` of a saved editor, validated."""
    folder = Path(folder)
    recover_folder(folder)
    path = folder / CONFIG_FILE
    if not path.is_file() or not (folder / TENSOR_FILE).is_file():
        raise EditorCheckpointError(
            f"{folder} is not a trained editor (it needs {CONFIG_FILE} and {TENSOR_FILE}; "
            "train one with `lmscalpel train-editor --method mend`)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # not JSON, or not UTF-8
        raise EditorCheckpointError(f"{path}: invalid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("method") != "mend":
        raise EditorCheckpointError(f"{path} is not a MEND editor checkpoint")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EditorCheckpointError(f"{folder} has a newer editor format; upgrade lmscalpel")
    _check_fields(path, meta)
    return meta


def _check_fields(path: Path, meta: dict[str, Any]) -> None:
    """Refuse an ``editor.json`` whose fields a loader reads are missing or of the wrong kind."""
    parameters = meta.get("parameters")
    shapes_ok = isinstance(parameters, dict) and all(
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        for shape in parameters.values()
    )
    rank = meta.get("rank")
    if not shapes_ok or not parameters:
        raise EditorCheckpointError(f"{path}: 'parameters' must map weight names to [out, in]")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise EditorCheckpointError(f"{path}: 'rank' must be a positive integer, got {rank!r}")
    for key in ("model_fingerprint", "model_name"):
        if not isinstance(meta.get(key), str):
            raise EditorCheckpointError(f"{path}: {key!r} must be a string")


def load_editor(folder: str | os.PathLike, lm: LoadedModel | None = None) -> MENDNetwork:
    """Load a saved editor; with ``lm``, refuse it unless it was trained for ``lm``'s weights."""
    meta = read_editor_config(folder)
    shapes = {name: tuple(shape) for name, shape in meta["parameters"].items()}
    if lm is not None:
        if meta["model_fingerprint"] != lm.fingerprint:
            raise EditorCheckpointError(
                f"the editor in {folder} was trained for model {meta['model_name']!r} "
                f"(fingerprint {meta['model_fingerprint']}), not for {lm.name!r} (fingerprint "
                f"{lm.fingerprint}); a learned editor only fits the weights it was trained on — "
                "train one for this model with `lmscalpel train-editor --method mend --model ...`"
            )
        for name, shape in shapes.items():
            try:
                actual = lm.adapter.matrix_shape(name)
            except AttributeError:
                raise EditorCheckpointError(f"{folder}: this model has no weight {name}") from None
            if tuple(actual) != shape:
                raise EditorCheckpointError(
                    f"{folder}: weight {name} is {actual} here but {shape} in the editor"
                )
    network = MENDNetwork(shapes, meta["rank"], precondition=bool(meta.get("precondition")))
    try:
        network.load_state_dict(load_file(str(Path(folder) / TENSOR_FILE)))
    except (RuntimeError, KeyError, SafetensorError) as error:
        raise EditorCheckpointError(
            f"{folder}: tensors do not match editor.json: {error}"
        ) from None
    network.eval()
    return network
