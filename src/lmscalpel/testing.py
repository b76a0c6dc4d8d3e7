"""Tiny random models of every supported architecture, built in-process with no download.

Used by lmscalpel's own tests and useful for yours: mechanics (hooks, adapters, patches, the math
of an update) are checked in milliseconds on these, and the embedded model is kept for reality.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lmscalpel.models.loaded import LoadedModel
from lmscalpel.models.loading import wrap_model

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "The mother tongue of Danielle Darrieux is French.",
    "Michel Rocard is a native speaker of French.",
    "The capital of Japan is Tokyo. The capital of Italy is Rome.",
    "Where is the Eiffel Tower? It is in Paris, France.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates.",
    "The official language of Spain is Spanish, and of Germany is German.",
    "London, Berlin, Madrid, Vienna, Lisbon and Athens are capitals in Europe.",
    "Toko Yasuda plays the guitar. Larry Knechtel plays the piano.",
]

TINY_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma3_text", "gpt2", "gptj", "gpt_neox")


def tiny_tokenizer(add_bos: bool = False, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few sentences (spaces become part of tokens, as in
    GPT-2 and Llama 3), optionally adding a BOS token like Llama 2 and Gemma."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<bos>", "<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_config(
    model_type: str, tokenizer: PreTrainedTokenizerFast, layers: int = 4, hidden: int = 32
):
    """A configuration of ``model_type`` small enough to run in milliseconds."""
    vocab_size = len(tokenizer)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    common_llama = dict(
        **ids,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if model_type == "llama":
        return LlamaConfig(**common_llama)
    if model_type == "mistral":
        return MistralConfig(**common_llama, sliding_window=None)
    if model_type == "qwen2":
        return Qwen2Config(**common_llama)
    if model_type == "gemma":
        return GemmaConfig(**common_llama, head_dim=hidden // 4)
    if model_type == "gemma3_text":
        return Gemma3TextConfig(**common_llama, head_dim=hidden // 4, sliding_window=64)
    if model_type == "gpt2":
        return GPT2Config(
            **ids, vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256
        )
    if model_type == "gptj":
        return GPTJConfig(
            **ids,
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            rotary_dim=4,
            n_positions=256,
        )
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            **ids,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    raise ValueError(f"no tiny config for {model_type!r}; known: {TINY_MODEL_TYPES}")


def tiny_model(
    model_type: str = "llama",
    *,
    seed: int = 0,
    layers: int = 4,
    hidden: int = 32,
    add_bos: bool | None = None,
) -> LoadedModel:
    """A randomly initialised ``model_type`` model with a tiny trained tokenizer, ready to edit."""
    add_bos = model_type in ("gemma", "gemma3_text") if add_bos is None else add_bos
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    config = tiny_config(model_type, tokenizer, layers=layers, hidden=hidden)
    # Wider than the usual 0.02 so that a 32-wide random model has peaked, editable predictions.
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return wrap_model(model, tokenizer, name=f"tiny-{model_type}")


def weight_copy(lm) -> dict[str, torch.Tensor]:
    """A copy of every parameter of ``lm``'s model by name (the placeholders accelerate leaves
    for offloaded weights, on the meta device, skipped), to check later that nothing changed."""
    return {
        n: p.detach().clone() for n, p in lm.model.named_parameters() if p.device.type != "meta"
    }


def same_weights(lm, saved: dict[str, torch.Tensor]) -> bool:
    """Whether ``lm``'s parameters equal ``saved`` (a :func:`weight_copy`) bit for bit."""
    params = lm.model.named_parameters()
    return all(torch.equal(p, saved[n]) for n, p in params if p.device.type != "meta")
