"""Shared LLM pieces used by LlamaRec, E4SRec, Laser and SeRALM."""

from recbole_llm.llm.backbone import (
    EMBEDDED_LLM,
    apply_lora,
    keep_first_layers,
    load_causal_lm,
    load_tokenizer,
    resolve_llm_path,
    set_num_threads,
    tiny_llama,
)

__all__ = [
    "EMBEDDED_LLM",
    "apply_lora",
    "keep_first_layers",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_llm_path",
    "set_num_threads",
    "tiny_llama",
]
