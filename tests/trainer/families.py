"""Tiny random models of the twelve families transformers ships that issue 15 tried, built from a
config and saved as safetensors with the project's byte tokenizer (what a user's checkpoint looks
like on disk, at a size CPU tests can train in a second).

Every family gets the same shape where its config allows it: hidden 32, 2 blocks, 4 heads (2 KV
heads with GQA), feed-forward 64, 256 positions. The per-family keyword arguments below are only
what the family needs to be that shape (Gemma's 256-wide default head, GPT-2's `n_*` names, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 32, 2, 4, 2, 64, 256

_LLAMA_LIKE = dict(
    hidden_size=HIDDEN,
    intermediate_size=FFN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=POSITIONS,
)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (transformers config class, its keyword arguments)
    "qwen2": ("Qwen2Config", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", {**_LLAMA_LIKE, "head_dim": HIDDEN // HEADS}),
    "mistral": ("MistralConfig", {**_LLAMA_LIKE, "sliding_window": None}),
    "gemma": ("GemmaConfig", {**_LLAMA_LIKE, "head_dim": HIDDEN // HEADS}),
    "gemma2": ("Gemma2Config", {**_LLAMA_LIKE, "head_dim": HIDDEN // HEADS, "sliding_window": 64}),
    "gemma3": ("Gemma3TextConfig", {**_LLAMA_LIKE, "head_dim": HIDDEN // HEADS, "sliding_window": 64}),
    "phi3": ("Phi3Config", {**_LLAMA_LIKE, "original_max_position_embeddings": POSITIONS}),
    "gpt2": ("GPT2Config", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=POSITIONS)),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            hidden_size=HIDDEN,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=POSITIONS,
        ),
    ),
    "falcon": (
        "FalconConfig",
        dict(
            hidden_size=HIDDEN,
            ffn_hidden_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_kv_heads=KV_HEADS,
            new_decoder_architecture=True,
            max_position_embeddings=POSITIONS,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=HIDDEN,
            ffn_dim=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            word_embed_proj_dim=HIDDEN,
            max_position_embeddings=POSITIONS,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        {**_LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    ),
}
"""The twelve families of issue 15 (Gemma 3 as its text-only model, what AutoModelForCausalLM builds)."""


def config(family: str, tokenizer: Any) -> Any:
    """The family's tiny config, with the byte tokenizer's vocabulary and special tokens."""
    import transformers

    cls_name, kwargs = FAMILIES[family]
    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg.vocab_size = len(tokenizer)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    return cfg


def build(family: str, directory: Path, seed: int = 0) -> Path:
    """Write the family's tiny model (safetensors) and the byte tokenizer into `directory`."""
    import torch
    from kubetune.trainer import builtin
    from transformers import AutoModelForCausalLM

    tok = builtin.byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config(family, tok))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory
