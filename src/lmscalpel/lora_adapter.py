"""Weight patches as PEFT LoRA adapters, for engines that serve many adapters over one base model.

A rank-r weight patch (ROME's rank-one update, MEMIT's and AlphaEdit's per-layer low-rank
updates, LoRA's merged product) changes a linear map ``W`` by ``Δ = B @ A`` with ``B`` of shape
(out, r) and ``A`` of shape (r, in): exactly what a LoRA adapter adds at inference (Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models"). :func:`export_lora_adapter` writes
one or several such patches as one PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained`` loads over the base
model, and that multi-LoRA servers (vLLM ``--enable-lora``, LoRAX, TGI) can serve
(docs/serving.md).

Conventions:

* ``lora_alpha = r`` so that PEFT's scaling ``alpha / r`` is 1 and the adapter adds ``B @ A``.
* Every module of the adapter has the same rank ``r`` (the largest over modules): smaller updates
  are padded with zero rows and columns, which changes nothing and keeps engines that demand one
  rank per adapter happy (no ``rank_pattern``).
* Stacked patches touching the same matrix concatenate their factors (ranks add), so the adapter
  equals applying all of them: weight patches are additive.
* Dense deltas (the fine-tuning family) are not low-rank; they are refused unless ``rank`` is
  given, and then approximated by a truncated SVD whose relative error is recorded.
* GPT-2-style ``Conv1D`` modules store (in, out); the adapter records ``fan_in_fan_out`` and the
  factors are laid out the way PEFT expects for them.

``lmscalpel_adapter.json`` beside the adapter files records the patches (method, requests,
digests) for the audit trail.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers.pytorch_utils import Conv1D

from lmscalpel.core.files import atomic_folder, replaceable
from lmscalpel.models.adapter import module_of
from lmscalpel.models.loaded import LoadedModel
from lmscalpel.patch import ParameterDelta, Patch, PatchError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
AUDIT_FILE = "lmscalpel_adapter.json"


@dataclass
class ModuleUpdate:
    """The stacked update of one linear module as ``B @ A`` in (out, in) layout."""

    module: str
    up: torch.Tensor  # B, (out, r)
    down: torch.Tensor  # A, (r, in)
    approximation_error: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])


def _as_out_in(
    lm: LoadedModel, delta: ParameterDelta, rank: int | None, method: str
) -> ModuleUpdate:
    """One delta of a ``method`` patch as (out, r) @ (r, in) factors of the module's (out, in)
    map (a truncated SVD when it is dense). PEFT's LoRA layer adds ``x Aᵀ Bᵀ`` to the module's
    output whatever its storage layout, so a ``Conv1D`` delta stored (in, out) as
    ``left @ right`` becomes ``B = rightᵀ``, ``A = leftᵀ``."""
    name = delta.name
    if not name.endswith(".weight"):
        raise PatchError(f"{name}: only the weight of a linear module can become a LoRA adapter")
    if not isinstance(lm.model.get_submodule(module_of(name)), (torch.nn.Linear, Conv1D)):
        raise PatchError(f"{name}: {module_of(name)} is not a linear module; LoRA cannot carry it")
    module = module_of(name)
    transposed = lm.adapter.is_transposed(name)
    error = 0.0
    if delta.dense is None:
        left, right = delta.left.double(), delta.right.double()  # storage (rows, r) @ (r, cols)
        up, down = (right.T, left.T) if transposed else (left, right)
    else:
        if rank is None:
            raise PatchError(
                f"{name} has a dense delta (method {method}); pass a rank to approximate it by "
                "a truncated SVD, e.g. --lora-rank 16"
            )
        full = delta.dense.double()
        matrix = full.T if transposed else full  # (out, in)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        keep = min(rank, int(s.numel()))
        up, down = u[:, :keep] * s[:keep], vh[:keep]
        total = float(matrix.norm())
        error = float((matrix - up @ down).norm()) / total if total > 0 else 0.0
    return ModuleUpdate(module, up, down, error)


def adapter_updates(
    lm: LoadedModel, patches: Sequence[Patch], rank: int | None = None
) -> list[ModuleUpdate]:
    """The per-module stacked factors of ``patches`` (checked: weight patches of ``lm``'s base
    model, finite), in the order the modules first appear."""
    if not patches:
        raise PatchError("no patches to export")
    if rank is not None and rank < 1:
        raise PatchError(f"the LoRA rank must be at least 1, got {rank}")
    stacked: dict[str, list[ModuleUpdate]] = {}
    for patch in patches:
        if patch.kind != "weights":
            raise PatchError(
                f"the in-context {patch.method} patch changes prompts, not weights; "
                "it has no LoRA form"
            )
        if patch.model_fingerprint is not None and patch.model_fingerprint != lm.fingerprint:
            raise PatchError(
                f"the {patch.method} patch was made for model {patch.model_fingerprint}, "
                f"not this model ({lm.fingerprint})"
            )
        for delta in patch.deltas:
            update = _as_out_in(lm, delta, rank, patch.method)
            stacked.setdefault(update.module, []).append(update)
    merged = []
    for module, parts in stacked.items():
        up = torch.cat([p.up for p in parts], dim=1)
        down = torch.cat([p.down for p in parts], dim=0)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise PatchError(f"{module}: the update is not finite; refusing to export it")
        merged.append(ModuleUpdate(module, up, down, max(p.approximation_error for p in parts)))
    return merged


def export_lora_adapter(
    lm: LoadedModel,
    patches: Patch | Sequence[Patch],
    folder: str | os.PathLike,
    *,
    rank: int | None = None,
) -> Path:
    """Write ``patches`` (stacked, see the module docstring) as a PEFT LoRA adapter for ``lm``'s
    base model. ``rank`` approximates dense deltas by a truncated SVD of that rank (refused
    without it). The folder is written whole or not at all and replaces only an earlier adapter
    export. ``lm`` is not changed."""
    patches = [patches] if isinstance(patches, Patch) else list(patches)
    folder = Path(folder)
    if not replaceable(folder, AUDIT_FILE):
        raise PatchError(f"{folder} exists and is not an exported adapter; choose another folder")
    updates = adapter_updates(lm, patches, rank)
    transposed = {lm.adapter.is_transposed(f"{u.module}.weight") for u in updates}
    if len(transposed) > 1:
        raise PatchError("one adapter cannot mix transposed (Conv1D) and plain linear modules")
    width = max(u.rank for u in updates)
    tensors: dict[str, torch.Tensor] = {}
    for update in updates:
        up = torch.zeros(update.up.shape[0], width, dtype=torch.float64)
        down = torch.zeros(width, update.down.shape[1], dtype=torch.float64)
        up[:, : update.rank], down[: update.rank] = update.up, update.down
        prefix = f"base_model.model.{update.module}"
        tensors[f"{prefix}.lora_A.weight"] = down.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = up.float().contiguous()
    config = LoraConfig(
        r=width,
        lora_alpha=width,
        target_modules=[u.module for u in updates],
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=transposed.pop(),
        base_model_name_or_path=lm.name,
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    audit = {
        "format": "lmscalpel LoRA adapter export",
        "base_model": lm.name,
        "base_fingerprint": lm.fingerprint,
        "rank": width,
        "modules": {
            u.module: {"rank": u.rank, "svd_relative_error": u.approximation_error} for u in updates
        },
        "patches": [p.metadata() for p in patches],
    }
    with atomic_folder(folder) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / AUDIT_FILE).write_text(json.dumps(audit, indent=2, ensure_ascii=False))
    return folder
