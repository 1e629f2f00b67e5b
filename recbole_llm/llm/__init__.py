"""Shared LLM pieces used by LlamaRec, E4SRec, Laser and SeRALM.

``backbone`` loads the LLM (``load_llm``, ``load_causal_lm``), ``embedded`` converts the embedded
default once, ``precision`` is the dtype boundary, ``lora`` adds LoRA and cuts decoder layers,
``preflight`` checks an ``llm_path`` before anything loads; ``prompts``, ``verbalizer``,
``batching`` and ``pluggable`` build what the models feed the LLM.
"""

from recbole_llm.llm.backbone import load_causal_lm, load_tokenizer, resolve_llm_path, set_num_threads
from recbole_llm.llm.embedded import EMBEDDED_LLM
from recbole_llm.llm.lora import apply_lora, keep_first_layers

__all__ = [
    "EMBEDDED_LLM",
    "apply_lora",
    "keep_first_layers",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_llm_path",
    "set_num_threads",
]
