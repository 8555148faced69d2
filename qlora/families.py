"""What differs between model families, as data: one place, no `if "qwen" in name` in the loop.

Most differences need no code: the tokenizer says whether it adds a BOS, the chat template says which
token ends an answer (qlora/prompts.py), and the model's config.json gives grouped-query attention,
tied embeddings, the vocabulary, soft-capping and sliding windows to transformers, the memory estimate
(qlora/estimate.py) and varlen and flex attention (qlora/attention.py). What is left is here:

- FAMILIES: the families tested (CPU: a toy model of each family's real architecture class with a
  tokenizer of its layout and its real chat template, tests/test_families.py; GPU: the real shapes,
  configs/models/), with the hub names people fine-tune;
- LEVER_LIMITS: a lever a model's architecture rules out, found from its config.json, refused before
  the model loads with the reason (`refusals`, which also refuses image-and-text models), and the
  nearest value it allows (`nearest_allowed`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qlora.config import ModelConfig

TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "initializer_range": 0.2}
"""Toy sizes shared by every family's CPU model: grouped-query attention (4 query heads, 2 KV heads)."""


@dataclass(frozen=True)
class Family:
    hub: tuple[str, ...]
    """Hub ids of the instruct models this family covers (their base models share the architecture)."""
    model_type: str
    """transformers' config class (AutoConfig.for_model) of the toy model."""
    tokenizer: str
    """A qlora.tiny.LAYOUTS name: the toy tokenizer's layout."""
    template: str
    """configs/templates/ file: the real chat template of the first hub id (see that folder's README)."""
    toy: tuple[tuple[str, Any], ...] = ()
    """Config values that make the toy model exercise what this family does differently."""


FAMILIES = {
    "llama3": Family(("meta-llama/Llama-3.1-8B-Instruct",), "llama", "llama3", "llama-3.1.jinja",
                     (("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 256}),)),
    "llama3.2": Family(("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct"), "llama",
                       "llama3-base", "llama-3.2.jinja", (("tie_word_embeddings", True),)),
    "qwen2.5": Family(("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"), "qwen2", "qwen", "qwen2.5.jinja"),
    "qwen3": Family(("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B"), "qwen3", "qwen3", "qwen3.jinja",
                    (("tie_word_embeddings", True),)),
    "mistral": Family(("mistralai/Mistral-Nemo-Instruct-2407", "mistralai/Mistral-7B-Instruct-v0.3"), "mistral",
                      "mistral", "mistral-nemo.jinja", (("sliding_window", 48),)),
    "gemma2": Family(("google/gemma-2-9b-it", "google/gemma-2-2b-it"), "gemma2", "gemma", "gemma-2.jinja",
                     (("sliding_window", 48), ("query_pre_attn_scalar", 24), ("attn_logit_softcapping", 50.0),
                      ("final_logit_softcapping", 30.0))),
    "gemma3": Family(("google/gemma-3-1b-it",), "gemma3_text", "gemma", "gemma-3.jinja",
                     (("sliding_window", 48), ("query_pre_attn_scalar", 24),
                      ("layer_types", ["sliding_attention", "full_attention"]))),
}
"""The toy sliding windows (48 tokens) are shorter than the fixture's examples, so they matter."""


@dataclass(frozen=True)
class LeverLimit:
    key: str
    """A model.* config key."""
    instead: dict[Any, Any]
    """Its values the architecture rules out, each with the nearest value it allows (nearest_allowed)."""
    applies: Any
    """(the model's config.json as an object) -> whether the architecture is one of those."""
    reason: str


LEVER_LIMITS = (
    # transformers' SDPA path drops the `softcap` argument without a word; torch's flash varlen kernel
    # has none: both would train a Gemma-2 with other attention than it was pretrained with. Eager is
    # SDPA's dense computation with the cap, flex varlen's bounded one (qlora/attention.py).
    LeverLimit("attn_implementation", {"sdpa": "eager", "varlen": "flex"},
               lambda c: getattr(c, "attn_logit_softcapping", None) is not None,
               "the model soft-caps its attention logits (Gemma-2), which eager and flex attention do here: "
               "set model.attn_implementation=flex (or eager)"),
)


def nearest_allowed(cfg: ModelConfig, hf_config: Any) -> ModelConfig:
    """`cfg` with each value the architecture rules out replaced by the nearest one it allows: what
    generation runs in place of a training-only attention (qlora/model.py), and what bench/compare_trl.py
    runs where a lever or TRL's side would set a refused value."""
    changes = {limit.key: limit.instead[getattr(cfg, limit.key)] for limit in LEVER_LIMITS
               if limit.applies(hf_config) and getattr(cfg, limit.key) in limit.instead}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def refusals(cfg: ModelConfig, hf_config: Any) -> list[str]:
    """Why this config cannot train this architecture: the model itself, or each lever the
    architecture rules out (empty: it can)."""
    problems = []
    if getattr(hf_config, "vision_config", None) is not None:
        # e.g. Gemma-3 4B and up (Gemma3ForConditionalGeneration): LoRA's q/k/v targets would
        # match the vision tower's attention too, and its layers are not priced by the estimate
        problems.append(f"{cfg.arch or cfg.name!r} is an image-and-text model ({hf_config.model_type}, a vision "
                        f"tower beside the decoder); this tool trains text decoders: use a text-only model")
    for limit in LEVER_LIMITS:
        value = getattr(cfg, limit.key)
        if value in limit.instead and limit.applies(hf_config):
            problems.append(f"model.{limit.key}={value}: {limit.reason}")
    return problems
