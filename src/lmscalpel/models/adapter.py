"""Architecture adapters: the one place that knows how each model family names its parts.

Every method asks the adapter for "layer ``l``", "the MLP output matrix of layer ``l`` as (out, in)"
or "the hidden state after layer ``l``", and never mentions GPT-2 or Llama itself. The adapter is
chosen from ``config.model_type`` (never from the model's name). New families are added with
:func:`register_architecture`.

Naming scheme (module paths relative to the causal-LM model)::

    embeddings        token embedding module (its output is the input of layer 0)
    layers[l]         decoder block l; its output is the residual stream after layer l
    layers[l].attn    the attention module (its output is the attention contribution)
    layers[l].mlp     the MLP module (its output is the MLP contribution)
    layers[l].mlp_out the MLP's output projection: its *input* is the key k, its output the value v
    final_norm        the final normalisation before the LM head
    lm_head           the unembedding

Besides names, the adapter holds the architecture facts that the runtime needs: the attention's
sliding window (:attr:`ModelAdapter.sliding_window`) and where a decoder block receives the
hidden state (:func:`hidden_input` / :func:`with_hidden_input`: its first argument, as in every
supported family).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class UnsupportedArchitectureError(ValueError):
    """Raised for a ``model_type`` that no adapter is registered for."""


@dataclass(frozen=True)
class ArchitectureSpec:
    """Dotted module paths of one model family (see the module docstring for the names).

    ``layers`` is the path of the list of decoder blocks; ``attn``, ``mlp`` and ``mlp_out`` are
    relative to one block.
    """

    model_types: tuple[str, ...]
    embeddings: str
    layers: str
    attn: str
    mlp: str
    mlp_out: str
    final_norm: str
    lm_head: str
    mlp_in: tuple[str, ...] = ()  # input projections of the MLP (relative to the block)


_LLAMA_LIKE = dict(
    embeddings="model.embed_tokens",
    layers="model.layers",
    attn="self_attn",
    mlp="mlp",
    mlp_out="mlp.down_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    final_norm="model.norm",
    lm_head="lm_head",
)

_REGISTRY: dict[str, ArchitectureSpec] = {}


def register_architecture(spec: ArchitectureSpec) -> None:
    """Register (or replace) the module paths for one or more ``config.model_type`` values.

    Example, for a family that names its parts like Llama::

        register_architecture(ArchitectureSpec(model_types=("my_llama",), embeddings=...,))
    """
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values an adapter exists for."""
    return sorted(_REGISTRY)


for _spec in (
    ArchitectureSpec(
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
        **_LLAMA_LIKE,
    ),
    ArchitectureSpec(
        model_types=("gemma3",),
        **{
            **_LLAMA_LIKE,
            "embeddings": "model.language_model.embed_tokens",
            "layers": "model.language_model.layers",
            "final_norm": "model.language_model.norm",
        },
    ),
    ArchitectureSpec(
        model_types=("gpt2",),
        embeddings="transformer.wte",
        layers="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_out="mlp.c_proj",
        mlp_in=("mlp.c_fc",),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    ArchitectureSpec(
        model_types=("gptj",),
        embeddings="transformer.wte",
        layers="transformer.h",
        attn="attn",
        mlp="mlp",
        mlp_out="mlp.fc_out",
        mlp_in=("mlp.fc_in",),
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    ArchitectureSpec(
        model_types=("gpt_neox",),
        embeddings="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mlp_out="mlp.dense_4h_to_h",
        mlp_in=("mlp.dense_h_to_4h",),
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
):
    register_architecture(_spec)


def spec_for(model_type: str) -> ArchitectureSpec:
    """The registered spec for ``model_type``, or a helpful error."""
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Unsupported architecture model_type={model_type!r}. Supported: "
            f"{', '.join(supported_model_types())}. To add one, describe where its parts live with "
            "lmscalpel.models.register_architecture(ArchitectureSpec(model_types=(...), "
            "embeddings=..., layers=..., attn=..., mlp=..., mlp_out=..., final_norm=..., lm_head=...))."
        ) from None


class ModelAdapter:
    """Uniform access to the parts of one loaded causal LM.

    Weights are always presented as (out_features, in_features), whatever the storage: GPT-2's
    ``Conv1D`` stores (in, out) and is transposed here, so methods write the same math for all.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.model_type: str = self.config.model_type
        self.spec = spec_for(self.model_type)

    # ---- names -------------------------------------------------------------------------------
    def layer_name(self, layer: int) -> str:
        self._check_layer(layer)
        return f"{self.spec.layers}.{layer}"

    def attn_name(self, layer: int) -> str:
        return f"{self.layer_name(layer)}.{self.spec.attn}"

    def mlp_name(self, layer: int) -> str:
        return f"{self.layer_name(layer)}.{self.spec.mlp}"

    def mlp_out_name(self, layer: int) -> str:
        return f"{self.layer_name(layer)}.{self.spec.mlp_out}"

    def mlp_out_weight_name(self, layer: int) -> str:
        """The ``named_parameters`` key of layer ``layer``'s MLP output matrix."""
        return f"{self.mlp_out_name(layer)}.weight"

    def mlp_in_weight_names(self, layer: int) -> list[str]:
        return [f"{self.layer_name(layer)}.{path}.weight" for path in self.spec.mlp_in]

    # ---- modules -----------------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    @property
    def num_layers(self) -> int:
        return len(self.module(self.spec.layers))

    @property
    def hidden_size(self) -> int:
        return int(self.embeddings.weight.shape[1])

    @property
    def embeddings_name(self) -> str:
        """Module path of the token embeddings (their output is the input of layer 0, before
        any position embeddings that the family adds)."""
        return self.spec.embeddings

    @property
    def embeddings(self) -> nn.Module:
        return self.module(self.spec.embeddings)

    @property
    def layer_list(self) -> nn.ModuleList:
        """The container of the decoder blocks, in order (the runtime swaps entries of it to skip
        blocks, see :func:`lmscalpel.runtime.layers.from_layer`)."""
        layers = self.module(self.spec.layers)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{self.spec.layers} is a {type(layers).__name__}, not a ModuleList")
        return layers

    def layer(self, layer: int) -> nn.Module:
        return self.module(self.layer_name(layer))

    def attn(self, layer: int) -> nn.Module:
        return self.module(self.attn_name(layer))

    def mlp(self, layer: int) -> nn.Module:
        return self.module(self.mlp_name(layer))

    def mlp_out(self, layer: int) -> nn.Module:
        return self.module(self.mlp_out_name(layer))

    @property
    def final_norm(self) -> nn.Module:
        return self.module(self.spec.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return self.module(self.spec.lm_head)

    @property
    def body(self) -> nn.Module:
        """The transformer without its LM head; its ``last_hidden_state`` is already normalised."""
        return self.model.base_model

    @property
    def sliding_window(self) -> int | None:
        """The attention's sliding window in tokens (``None`` without one): a key/value cache
        keeps only the last ``sliding_window - 1`` positions of its sliding layers."""
        config = self.config.get_text_config(decoder=True)
        window = getattr(config, "sliding_window", None)
        return int(window) if window else None

    @property
    def max_context(self) -> int:
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    # ---- weights as (out, in) ----------------------------------------------------------------
    def layer_of(self, param_name: str) -> int:
        """Index of the decoder block holding ``param_name``."""
        prefix = self.spec.layers + "."
        index = param_name[len(prefix) :].split(".", 1)[0]
        if not param_name.startswith(prefix) or not index.isdigit():
            raise ValueError(f"{param_name} lies in no decoder block")
        return int(index)

    def matrix_shape(self, param_name: str) -> tuple[int, int]:
        """(out, in) of a weight matrix, whatever its storage layout."""
        rows, cols = self.model.get_parameter(param_name).shape
        return (cols, rows) if self.is_transposed(param_name) else (rows, cols)

    def is_transposed(self, param_name: str) -> bool:
        """True when the parameter is stored (in, out), as in GPT-2's ``Conv1D``."""
        module_name, _, leaf = param_name.rpartition(".")
        return leaf == "weight" and isinstance(self.module(module_name), Conv1D)

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s MLP output matrix as an (out, in) view sharing storage."""
        weight = self.model.get_parameter(self.mlp_out_weight_name(layer))
        return weight.T if self.is_transposed(self.mlp_out_weight_name(layer)) else weight

    def mlp_key_size(self, layer: int) -> int:
        """Dimension of the keys (inputs of the MLP output matrix)."""
        return int(self.mlp_out_weight(layer).shape[1])

    def to_storage(self, param_name: str, matrix: torch.Tensor) -> torch.Tensor:
        """Turn an (out, in) matrix into the parameter's storage layout."""
        return matrix.T if self.is_transposed(param_name) else matrix

    def low_rank_to_storage(
        self, param_name: str, left: torch.Tensor, right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (left (out, r), right (r, in)) of an (out, in) update, in storage layout.

        For a transposed parameter (u vᵀ)ᵀ = v uᵀ, so the factors swap and transpose.
        """
        if self.is_transposed(param_name):
            return right.T.contiguous(), left.T.contiguous()
        return left, right

    # ---- reading logits ----------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Apply the LM head (and the family's final soft-capping, if any) to normalised states."""
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_layer(self, layer: int) -> None:
        n = len(self.module(self.spec.layers))
        if not 0 <= layer < n:
            raise IndexError(f"layer {layer} out of range: this model has layers 0..{n - 1}")

    def __repr__(self) -> str:
        return f"ModelAdapter(model_type={self.model_type!r}, layers={self.num_layers})"


def module_of(param_name: str) -> str:
    """``"model.layers.3.mlp.down_proj.weight"`` -> ``"model.layers.3.mlp.down_proj"``."""
    return param_name.rpartition(".")[0]


HIDDEN_ARGUMENT = "hidden_states"
"""The keyword under which decoder blocks take the hidden state when it is not passed first."""


def hidden_input(args: tuple, kwargs: Mapping[str, object]) -> torch.Tensor:
    """The hidden-state tensor a module is called with: its first positional argument, else the
    ``hidden_states`` keyword, else its first keyword argument.

    Every supported decoder block takes the hidden state first (and linear layers their input),
    so this is the one place that assumption is written down.
    """
    if args:
        return first_tensor(args[0])
    if HIDDEN_ARGUMENT in kwargs:
        return first_tensor(kwargs[HIDDEN_ARGUMENT])
    if kwargs:
        return first_tensor(next(iter(kwargs.values())))
    raise TypeError("the module was called without arguments: no hidden state to read")


def with_hidden_input(
    args: tuple, kwargs: Mapping[str, object], hidden: torch.Tensor
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the argument :func:`hidden_input` reads replaced by ``hidden``."""
    if args:
        return (hidden, *args[1:]), dict(kwargs)
    key = HIDDEN_ARGUMENT if HIDDEN_ARGUMENT in kwargs else next(iter(kwargs), None)
    if key is None:
        raise TypeError("the module was called without arguments: no hidden state to replace")
    return args, {**kwargs, key: hidden}


def first_tensor(output: object) -> torch.Tensor:
    """The hidden-state tensor of a module output that may be a tensor or a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find a hidden-state tensor in module output of type {type(output)}")


def replace_first_tensor(output: object, new: torch.Tensor) -> object:
    """``output`` with its hidden-state tensor replaced by ``new`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    raise TypeError(f"cannot replace the hidden state in module output of type {type(output)}")
